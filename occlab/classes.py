"""The occlab label convention (DESIGN.md §2): 0 = free, the 10 CarlaSC classes, bicycle for Occ3D sets."""
from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "free", "building", "barrier", "other", "pedestrian", "pole",
    "road", "ground", "sidewalk", "vegetation", "vehicle", "bicycle",
)
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
FREE = 0
IGNORE = 255
NUM_CLASSES_CARLASC = 11  # free + 10 semantic classes
NUM_CLASSES_OCC3D = 12  # + bicycle

# One colour per class (RGB 0..255), used by every renderer of the kit.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),  # free
    (230, 140, 60),   # building
    (120, 120, 120),  # barrier
    (255, 220, 0),    # other
    (220, 20, 60),    # pedestrian
    (153, 153, 255),  # pole
    (128, 64, 128),   # road
    (150, 110, 60),   # ground
    (244, 35, 232),   # sidewalk
    (60, 160, 40),    # vegetation
    (0, 60, 200),     # vehicle
    (0, 200, 200),    # bicycle
)


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names of the first `num_classes` labels (11 for CarlaSC-style sets, 12 with bicycle)."""
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 2..{len(CLASS_NAMES)}, got {num_classes}")
    return CLASS_NAMES[:num_classes]
