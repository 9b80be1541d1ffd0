"""Readers for evaluation datasets: HPatches / Oxford affine homography sequences, ScanNet pairs.

Homography sequences. Two layouts are recognised, with images of ANY common extension
(the HPatches release ships ``.ppm``, our shared copy ``.png``):

- HPatches sequences release: folders ``i_*`` (illumination) / ``v_*`` (viewpoint) holding
  ``1.<ext> .. 6.<ext>`` and ``H_1_2 .. H_1_6``;
- Oxford affine (Mikolajczyk et al.): ``img1.<ext> .. img6.<ext>`` and ``H1to2p .. H1to6p``.

Ground truth maps pixels of image 1 to pixels of image k. Pairs are (1, k), k = 2..6, for each
k whose image and GT file both exist (a sequence may be partial).

Category: ``i_*`` is "illumination", ``v_*`` is "viewpoint". Oxford sequences have no prefix;
we count the photometric ones whose geometry is (nearly) fixed (``leuven`` light, ``bikes`` /
``trees`` blur, ``ubc`` JPEG) as "illumination", like HPatches ``i_*``, and the geometric ones
(``graf``, ``wall``, ``bark``, ``boat`` and anything unknown) as "viewpoint".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DiftSfmError

IMAGE_EXTENSIONS = (".png", ".ppm", ".pgm", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# The sequences of the HPatches release dropped by the standard 108-sequence subset
# (their images are larger than 1600x1200).
HPATCHES_EXCLUDED = (
    "i_contruction", "i_crownnight", "i_dc", "i_pencils", "i_whitebuilding",
    "v_artisans", "v_astronautis", "v_talent",
)
OXFORD_PHOTOMETRIC = ("leuven", "bikes", "trees", "ubc")
#: ``subset`` values of :func:`find_sequences`: every sequence, or the standard 108.
SUBSETS = ("full", "108")
#: The categories of homography pairs, and "all" (the benchmarks report each).
CATEGORIES = ("illumination", "viewpoint", "all")


class DatasetError(DiftSfmError):
    """A benchmark dataset is missing, incomplete or has malformed ground truth."""


@dataclass
class HomographyPair:
    """One (1, k) pair. ``name0``/``name1`` are image paths relative to the dataset root
    (POSIX, used as keys in features/matches files); ``H`` maps image-0 to image-1 pixels."""

    sequence: str
    category: str
    k: int
    name0: str
    name1: str
    H: np.ndarray


@dataclass
class Sequence:
    name: str
    category: str  # "illumination" | "viewpoint"
    layout: str  # "hpatches" | "oxford"
    path: Path
    images: dict[int, Path] = field(default_factory=dict)  # index 1..6 -> file


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def read_homography(path: Path) -> np.ndarray:
    """Read a 3x3 homography text file (whitespace separated); clear error naming the file."""
    path = Path(path)
    try:
        values = [float(v) for v in path.read_text().split()]
    except FileNotFoundError as err:
        raise DatasetError(f"Ground-truth homography {path} does not exist.") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"Ground-truth homography {path} is malformed: {err}. "
                           "Expected 9 numbers (a 3x3 matrix, row by row).") from err
    if len(values) != 9:
        raise DatasetError(f"Ground-truth homography {path} has {len(values)} numbers, "
                           "expected 9 (a 3x3 matrix, row by row).")
    H = np.array(values, np.float64).reshape(3, 3)
    if not np.isfinite(H).all() or abs(np.linalg.det(H)) < 1e-12 or H[2, 2] == 0:
        raise DatasetError(f"Ground-truth homography {path} is singular or not finite.")
    return H / H[2, 2]


def _category(name: str, layout: str) -> str:
    if layout == "hpatches":
        return "illumination" if name.startswith("i_") else "viewpoint"
    return "illumination" if name.lower() in OXFORD_PHOTOMETRIC else "viewpoint"


def read_sequence(path: Path) -> Sequence | None:
    """Recognise one sequence folder; None if it is neither layout."""
    path = Path(path).resolve()
    if not path.is_dir():
        return None
    for layout, stem in (("hpatches", "{}"), ("oxford", "img{}")):
        first = _find_image(path, stem.format(1))
        if first is None:
            continue
        seq = Sequence(path.name, _category(path.name, layout), layout, path)
        for i in range(1, 7):
            img = _find_image(path, stem.format(i))
            if img is not None:
                seq.images[i] = img
        return seq
    return None


def gt_path(seq: Sequence, k: int) -> Path:
    return seq.path / (f"H_1_{k}" if seq.layout == "hpatches" else f"H1to{k}p")


def find_sequences(roots: Path | list[Path], subset: str = "full") -> list[Sequence]:
    """All sequences under ``roots`` (each a folder of sequences, or one sequence folder),
    sorted by name. ``subset="108"`` drops :data:`HPATCHES_EXCLUDED`."""
    if subset not in SUBSETS:
        raise DatasetError(f"Unknown subset '{subset}', use 'full' or '108'.")
    roots = [Path(r) for r in ([roots] if isinstance(roots, (str, Path)) else roots)]
    found: dict[str, Sequence] = {}
    for root in roots:
        if not root.is_dir():
            raise DatasetError(f"Dataset folder {root} does not exist.")
        seq = read_sequence(root)
        candidates = [seq] if seq else [read_sequence(p) for p in sorted(root.iterdir())]
        for cand in candidates:
            if cand is None:
                continue
            if cand.name in found:
                raise DatasetError(f"Sequence name '{cand.name}' appears twice: "
                                   f"{found[cand.name].path} and {cand.path}.")
            found[cand.name] = cand
    if not found:
        raise DatasetError(
            f"No HPatches ('1.ppm'.., 'H_1_2'..) or Oxford ('img1.ppm'.., 'H1to2p'..) "
            f"sequences found in {', '.join(map(str, roots))}.")
    seqs = sorted(found.values(), key=lambda s: s.name)
    if subset == "108":
        seqs = [s for s in seqs if s.name not in HPATCHES_EXCLUDED]
    return seqs


def homography_pairs(sequences: list[Sequence], base: Path) -> list[HomographyPair]:
    """The (1, k) pairs of ``sequences`` whose image k and GT file exist. Names are relative
    to ``base`` (a common ancestor of all sequence folders)."""
    pairs = []
    for seq in sequences:
        if 1 not in seq.images:
            continue
        for k in range(2, 7):
            gt = gt_path(seq, k)
            if k not in seq.images or not gt.exists():
                continue
            pairs.append(HomographyPair(
                seq.name, seq.category, k,
                seq.images[1].relative_to(base).as_posix(),
                seq.images[k].relative_to(base).as_posix(),
                read_homography(gt)))
    return pairs


def common_base(sequences: list[Sequence]) -> Path:
    """The deepest folder containing every sequence folder (the image root for extraction)."""
    import os

    paths = [str(s.path.resolve().parent) for s in sequences]
    return Path(os.path.commonpath(paths))


@dataclass
class PosePair:
    """One ScanNet-style pair: images, intrinsics (3, 3) for the stored resolution, and
    ``T_0to1`` (4, 4) mapping camera-0 to camera-1 coordinates; ``rot0``/``rot1`` are
    EXIF-like quarter turns (see :func:`read_pose_pairs`)."""

    name0: str
    name1: str
    rot0: int
    rot1: int
    K0: np.ndarray
    K1: np.ndarray
    T_0to1: np.ndarray

    @property
    def R(self) -> np.ndarray:
        return self.T_0to1[:3, :3]

    @property
    def t(self) -> np.ndarray:
        return self.T_0to1[:3, 3]


def read_pose_pairs(path: Path) -> list[PosePair]:
    """Read a SuperGlue ``pairs_with_gt.txt``: 38 columns per line,
    ``name0 name1 rot0 rot1 K0(9) K1(9) T_0to1(16)`` (row-major).

    ``rot0``/``rot1`` (quarter turns) tell a matcher to rotate the images upright before
    description. We evaluate in the stored pixel frame, where the given K and T are valid
    whatever the rotation, so they do not change the geometry; they are kept on the pair.
    Blank lines and ``#`` comments are skipped. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Pairs file {path} does not exist.")
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cols = line.split()
        if len(cols) != 38:
            raise DatasetError(f"{path}:{lineno}: expected 38 columns (name0 name1 rot0 rot1 "
                               f"K0(9) K1(9) T_0to1(16)), got {len(cols)}.")
        try:
            rot0, rot1 = int(cols[2]), int(cols[3])
            values = np.array([float(v) for v in cols[4:]], np.float64)
        except ValueError as err:
            raise DatasetError(f"{path}:{lineno}: non-numeric value: {err}.") from err
        K0, K1, T = values[:9].reshape(3, 3), values[9:18].reshape(3, 3), values[18:].reshape(4, 4)
        if not np.isfinite(values).all():
            raise DatasetError(f"{path}:{lineno}: non-finite values.")
        R = T[:3, :3]
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-3) or not np.allclose(T[3], [0, 0, 0, 1]):
            raise DatasetError(f"{path}:{lineno}: T_0to1 is not a rigid transform.")
        if K0[2, 2] == 0 or K1[2, 2] == 0:
            raise DatasetError(f"{path}:{lineno}: malformed intrinsics.")
        pairs.append(PosePair(cols[0], cols[1], rot0, rot1, K0 / K0[2, 2], K1 / K1[2, 2], T))
    if not pairs:
        raise DatasetError(f"Pairs file {path} has no pairs.")
    return pairs
