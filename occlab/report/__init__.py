"""Reports: the HTML index of a reproduction run and offline notebook exports (heavy imports stay lazy)."""
from occlab.report.html import notebook_to_html, write_index

__all__ = ["notebook_to_html", "write_index"]
