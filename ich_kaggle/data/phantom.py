"""Procedural head CT phantoms in Hounsfield units, with the five hemorrhage subtypes, for the synthetic competition.

Everything is evaluated on the 3-D patient coordinates of each slice's pixels, so a gantry-tilted series cuts the
head obliquely like a real one, lesions are 3-D objects that persist over adjacent slices, and a slice is labelled
positive for a subtype exactly when that lesion's mask has a pixel in it. Vectorised numpy: ~50 ms per 30-slice study.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.labels import LABELS

SUBTYPES: tuple[str, ...] = LABELS[1:]

# Hounsfield values of the tissues (acute blood is 50-90 HU; brain 25-40 HU; CSF ~5 HU).
HU_AIR = -1000.0
HU_FAT = -90.0
HU_SKIN = 35.0
HU_CSF = 6.0
HU_GREY = 38.0
HU_WHITE = 27.0
HU_DEEP_GREY = 35.0
HU_FALX = 50.0
HU_EDEMA = 16.0
HU_MIN, HU_MAX = -1000, 3000  # written range: every header variant (the corrupted one included) stores it exactly


@dataclass
class Lesion:
    """One 3-D hemorrhage in head coordinates (mm); `kind` is a LABELS subtype."""

    kind: str
    center: tuple[float, float, float]
    radius: float  # extent along the skull (epi/subdural), ellipsoid scale (parenchymal), sphere (SAH)
    thickness: float = 0.0  # max depth from the inner skull (epidural/subdural)
    hu: float = 70.0
    side: int = 1  # which lateral ventricle (intraventricular)
    level: float = 0.0  # fluid level as a fraction of the ventricle's A-P length (intraventricular)
    axes: tuple[float, float, float] = (1.0, 1.0, 1.0)  # ellipsoid axes multipliers (intraparenchymal)
    phase: float = 0.0  # shape irregularity phase


@dataclass
class Anatomy:
    """Head shape (outer skull semi-axes, mm), skull thickness and the sulcal pattern."""

    axes: tuple[float, float, float] = (72.0, 90.0, 86.0)
    skull: float = 6.5
    sulci: int = 14
    sulcus_phase: float = 0.0
    sulcus_twist: float = 0.5
    vent_scale: float = 1.0


@dataclass
class Geometry:
    """Where the slices are: pixel grid in the patient frame, gantry tilt and head pose."""

    size: int = 128
    slices: int = 30
    spacing: float = 1.95  # mm per pixel
    dz: float = 5.0  # slice spacing along the normal (mm)
    tilt_deg: float = 0.0  # gantry tilt about the patient x axis
    yaw_deg: float = 0.0  # head rotation in the axial plane
    head_center: tuple[float, float, float] = (0.0, 0.0, 120.0)  # patient coordinates (mm)
    first_offset: float = -40.0  # normal coordinate of slice 0 relative to the head centre (mm)
    pan: tuple[float, float] = (0.0, 0.0)  # FOV centre offset from the head centre (mm, row/col directions)

    @property
    def row_dir(self) -> np.ndarray:
        return np.array([1.0, 0.0, 0.0])

    @property
    def col_dir(self) -> np.ndarray:
        t = np.deg2rad(self.tilt_deg)
        return np.array([0.0, np.cos(t), -np.sin(t)])

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def positions(self) -> np.ndarray:
        """ImagePositionPatient (top-left pixel centre) of every slice, (S, 3)."""
        c = np.asarray(self.head_center)
        half = (self.size - 1) / 2 * self.spacing
        centre0 = c + self.pan[0] * self.row_dir + self.pan[1] * self.col_dir + self.first_offset * self.normal
        top_left = centre0 - half * self.row_dir - half * self.col_dir
        return top_left[None, :] + np.arange(self.slices)[:, None] * self.dz * self.normal[None, :]

    def orientation(self) -> list[float]:
        return [*self.row_dir.tolist(), *self.col_dir.tolist()]

    def head_coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head-frame coordinates x, y, z (mm) of every pixel centre, each (S, H, W) float32 (separate arrays:
        reductions over a trailing axis of 3 are several times slower in numpy)."""
        idx = np.arange(self.size, dtype=np.float32) * np.float32(self.spacing)
        ipp = self.positions() - np.asarray(self.head_center)
        yaw = np.deg2rad(self.yaw_deg)
        rot = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
        # head = rot^T-frame: each head axis is an affine function of (slice, row, column)
        out = []
        for axis in range(3):
            r = np.float32(self.row_dir @ rot[:, axis])
            c = np.float32(self.col_dir @ rot[:, axis])
            o = (ipp @ rot[:, axis]).astype(np.float32)
            out.append(o[:, None, None] + c * idx[None, :, None] + r * idx[None, None, :])
        return out[0], out[1], out[2]


@dataclass
class Rendered:
    """Ground truth of one study, in slice order: HU (int16, exactly what the DICOMs store), masks and labels."""

    hu: np.ndarray  # (S, H, W) int16
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # subtype -> (S, H, W) bool
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, len(LABELS)), np.int8))  # (S, 6) in LABELS order
    regions: dict[str, np.ndarray] = field(default_factory=dict)  # skull, brain, ventricles, sulci: (S, H, W) bool


def _smooth(v: np.ndarray) -> np.ndarray:
    """In-plane [1, 2, 1] binomial blur: the partial-volume softness of a real reconstruction."""
    out = v.copy()
    out[:, 1:-1, :] = 0.25 * v[:, :-2, :] + 0.5 * v[:, 1:-1, :] + 0.25 * v[:, 2:, :]
    tmp = out.copy()
    out[:, :, 1:-1] = 0.25 * tmp[:, :, :-2] + 0.5 * tmp[:, :, 1:-1] + 0.25 * tmp[:, :, 2:]
    return out


def _ellipsoid(q, center, axes) -> np.ndarray:
    """Normalised ellipsoid radius (<1 inside) of the points q = (x, y, z)."""
    total = None
    for v, c0, ax in zip(q, center, axes):
        d = (v - np.float32(c0)) * np.float32(1.0 / ax)
        total = d * d if total is None else total + d * d
    return np.sqrt(total)


def ventricle_masks(q, an: Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left and right lateral ventricles (frontal horns near the septum, bodies diverging and bending down
    posteriorly) and the slit-like third ventricle."""
    c = an.axes[2]
    s = an.vent_scale
    x, y, z = q
    zc = 0.22 * c
    out = []
    for side in (-1, 1):
        xoff = side * (6.0 + 0.12 * np.clip(y, -30, 40)) * s
        zoff = zc - 0.006 * (y - 5.0) ** 2
        half_width = 5.5 * s * (1.0 + 0.25 * np.clip(y / 40.0, -1, 1))
        dx = (x - xoff) / half_width
        dy = (y - 5.0) * np.float32(1.0 / (32.0 * s))
        dz = (z - zoff) * np.float32(1.0 / (8.0 * s))
        out.append(dx * dx + dy * dy + dz * dz < 1.0)
    third = _ellipsoid(q, (0.0, 8.0, 0.02 * c), (1.6 * s, 11.0 * s, 9.0 * s)) < 1.0
    return out[0], out[1], third


@dataclass
class _Head:
    """Every pixel centre in the head frame (x, y, z in mm, each (S, H, W) float32) and where it lies against the
    inner skull, the measures every tissue and lesion is drawn from."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    inner_axes: tuple[float, float, float]  # semi-axes of the inner skull surface (mm)
    radial: np.ndarray  # distance from the head centre (mm)
    r_inner: np.ndarray  # normalised inner-skull radius (< 1 inside the cranial cavity)
    depth: np.ndarray  # mm from the inner skull surface along the ray from the centre (inside: > 0)

    @property
    def q(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x, self.y, self.z


@dataclass
class _Tissues:
    """The masks lesions are placed against (each (S, H, W) bool)."""

    brain: np.ndarray
    csf_space: np.ndarray  # sulci, convexity rim and basal cisterns (the ventricles excluded from SAH separately)
    left: np.ndarray  # left lateral ventricle
    right: np.ndarray  # right lateral ventricle
    third: np.ndarray  # third ventricle
    ventricles: np.ndarray  # brain & (left | right | third)


def _head_frame(geom: Geometry, an: Anatomy) -> _Head:
    x, y, z = geom.head_coords()
    outer_a, outer_b, outer_c = an.axes
    inner_axes = (outer_a - an.skull, outer_b - an.skull, outer_c - an.skull)
    r_inner = _ellipsoid((x, y, z), (0, 0, 0), inner_axes)
    radial = np.sqrt(x * x + y * y + z * z)
    depth = radial * (1.0 / np.maximum(r_inner, 1e-6) - 1.0)
    return _Head(x, y, z, inner_axes, radial, r_inner, depth)


def _scalp_and_skull(head: _Head, an: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Air, skin, subcutaneous fat and the skull vault (dense tables, a diploe between them): (float32 HU, skull)."""
    outer_a, outer_b, outer_c = an.axes
    x, y, z = head.q
    r_outer = _ellipsoid(head.q, (0, 0, 0), an.axes)
    r_skin = _ellipsoid(head.q, (0, 0, 0), (outer_a + 6.0, outer_b + 6.0, outer_c + 6.0))
    r_fat = _ellipsoid(head.q, (0, 0, 0), (outer_a + 4.0, outer_b + 4.0, outer_c + 4.0))
    hu = np.full(x.shape, HU_AIR, np.float32)
    hu[r_skin < 1.0] = HU_SKIN
    hu[r_fat < 1.0] = HU_FAT
    skull = (r_outer < 1.0) & (head.r_inner >= 1.0)
    to_outer = head.radial * (1.0 / np.maximum(r_outer, 1e-6) - 1.0)  # mm to the outer skull surface (inside: >0)
    # 0 at the inner table, 1 at the outer
    across = np.clip(-head.depth / np.maximum(to_outer - head.depth, 1e-3), 0.0, 1.0)
    hu[skull] = (
        1550.0
        - 650.0 * np.sin(np.pi * across[skull])
        + 120.0 * np.sin(0.11 * x[skull] + 0.07 * y[skull] + 0.05 * z[skull])
    )
    return hu, skull


def _skull_base(hu: np.ndarray, head: _Head, an: Anatomy) -> np.ndarray:
    """Below the floor of the anterior/middle fossae only the temporal lobes and the posterior fossa (cerebellum)
    remain brain; the rest is bone with the air of the sphenoid sinus and denser petrous ridges. Drawn into `hu`;
    returns the base's mask (bone from then on, no longer brain)."""
    x, y, z = head.q
    inner_a, inner_b, inner_c = head.inner_axes
    floor = -0.3 * an.axes[2]
    low = (head.r_inner < 1.0) & (z < floor)
    # the fossae that hold brain below the floor: anterior/middle midline, and the two temporal lobes
    midline = _ellipsoid(head.q, (0.0, 0.4 * inner_b, -0.5 * inner_c), (0.85 * inner_a, 0.58 * inner_b, 0.45 * inner_c))
    temporal_axes = (0.42 * inner_a, 0.5 * inner_b, 0.3 * inner_c)
    left_temporal = _ellipsoid(head.q, (-0.6 * inner_a, -0.12 * inner_b, floor), temporal_axes)
    right_temporal = _ellipsoid(head.q, (0.6 * inner_a, -0.12 * inner_b, floor), temporal_axes)
    fossae = (midline < 1) | (left_temporal < 1) | (right_temporal < 1)
    base = low & ~fossae
    hu[base] = 900.0 + 80.0 * np.sin(0.2 * x[base] + 0.13 * y[base])
    petrous = base & (np.abs(np.abs(x) * 0.6 - (y - 0.12 * inner_b)) < 4.0) & (np.abs(x) > 10)
    hu[petrous] = 1700.0
    sinus = base & (_ellipsoid(head.q, (0.0, -0.3 * inner_b, floor - 0.08 * inner_c), (13.0, 11.0, 9.0)) < 1)
    hu[sinus] = HU_AIR
    return base


def _sulci_and_grey(head: _Head, an: Anatomy, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sulci (thin radial CSF clefts from the surface inward, wavy over z and of varying depth) and the grey matter
    of the cortex around them, computed on the brain voxels only: (sulci, grey) masks."""
    outer_a, outer_b, _ = an.axes
    xb, yb, zb, depth_b = head.x[brain], head.y[brain], head.z[brain], head.depth[brain]
    theta = np.arctan2(yb / outer_b, xb / outer_a)
    pattern = np.abs(
        np.sin(
            an.sulci * theta
            + an.sulcus_phase
            + an.sulcus_twist * np.sin(zb / 9.0)
            + 0.8 * np.sin(3 * theta + zb / 23.0)
            + 1.6 * np.sin(2 * theta + 2.0 * an.sulcus_phase)
        )
    )
    sulcus_depth = 11.0 + 6.0 * np.sin(5 * theta + zb / 17.0 + an.sulcus_phase) * np.sin(7 * theta + 1.0)
    sulci = np.zeros_like(brain)
    sulci[brain] = (pattern < 0.3) & (depth_b > 1.0) & (depth_b < sulcus_depth)
    grey = np.zeros_like(brain)
    grey[brain] = (depth_b < 6.0) | ((pattern < 0.75) & (depth_b < sulcus_depth + 4.0))
    return sulci, grey


def _parenchyma(hu: np.ndarray, head: _Head, an: Anatomy, brain: np.ndarray, grey: np.ndarray) -> None:
    """White matter, cortical grey, the deep grey nuclei and the falx, drawn into `hu`."""
    x, y, z = head.q
    c = an.axes[2]
    hu[brain] = HU_WHITE
    hu[grey] = HU_GREY
    deep = brain & (
        (_ellipsoid(head.q, (-14.0, 6.0, 0.05 * c), (7.0, 14.0, 10.0)) < 1)
        | (_ellipsoid(head.q, (14.0, 6.0, 0.05 * c), (7.0, 14.0, 10.0)) < 1)
    )
    hu[deep] = HU_DEEP_GREY
    falx = brain & (np.abs(x) < 1.0) & (z > 0.05 * c) & ((np.abs(y) > 30.0) | (z > 0.45 * c))
    hu[falx] = HU_FALX


def _basal_cisterns(head: _Head, an: Anatomy, brain: np.ndarray) -> np.ndarray:
    """A thin five-pointed star-shaped CSF shell around the midbrain (suprasellar/ambient cisterns)."""
    x, y, _ = head.q
    shell = _ellipsoid(head.q, (0.0, 10.0, -0.18 * an.axes[2]), (24.0, 20.0, 9.0))
    near = shell < 1.2
    star = np.zeros_like(brain)
    star[near] = np.abs(shell[near] - 0.8 - 0.15 * np.cos(5 * np.arctan2(x[near], -(y[near] - 10.0)))) < 0.09
    return brain & star


def _extra_axial(les: Lesion, head: _Head, tissues: _Tissues, an: Anatomy) -> np.ndarray:
    """Epidural (biconvex lens) or subdural (crescent) blood: a layer under the inner skull around `les.center`."""
    x, y, z = head.q
    inner = head.inner_axes
    along_skull = sum(an.axes) / 3.0  # radius that turns the angle from the centre into mm along the skull
    direction = np.asarray(les.center, np.float64) / np.asarray(inner)
    direction /= np.linalg.norm(direction)
    cos = (
        x * np.float32(direction[0] / inner[0])
        + y * np.float32(direction[1] / inner[1])
        + z * np.float32(direction[2] / inner[2])
    ) / np.maximum(head.r_inner, 1e-6)
    near = cos > np.cos(min(les.radius / along_skull, np.pi))
    rho = np.arccos(np.clip(cos[near], -1.0, 1.0)) * along_skull  # distance along the skull from the centre
    s = rho / les.radius
    if les.kind == "epidural":  # biconvex lens: thickest at the centre, tapering to 0 at the rim
        thick = les.thickness * (1.0 - s**2)
    else:  # crescent: nearly uniform, spread wide, tapering only at its ends
        thick = les.thickness * (1.0 - s**4) * (1.0 + 0.15 * np.sin(3 * s + les.phase))
    mask = np.zeros_like(tissues.brain)
    mask[near] = tissues.brain[near] & (head.depth[near] < thick)
    return mask


def _intraparenchymal(les: Lesion, head: _Head, tissues: _Tissues) -> tuple[np.ndarray, np.ndarray]:
    """A lumpy ellipsoidal clot and the ring of edema around it (outside the ventricles): (clot, edema)."""
    x, y, z = head.q
    cx, cy, cz = les.center
    ax = [les.radius * m for m in les.axes]
    dx, dy, dz = (x - np.float32(cx)) / ax[0], (y - np.float32(cy)) / ax[1], (z - np.float32(cz)) / ax[2]
    rr = np.sqrt(dx * dx + dy * dy + dz * dz)
    close = rr < 1.35 * 1.18  # the lumps change the radius by at most 18 %
    lumpy = 1.0 + 0.18 * np.sin(3 * np.arctan2(dy[close], dx[close]) + les.phase) * np.cos(2 * dz[close] + les.phase)
    rr[close] /= lumpy
    edema = tissues.brain & (rr >= 1.0) & (rr < 1.35) & ~tissues.ventricles
    return tissues.brain & (rr < 1.0), edema


def _intraventricular(les: Lesion, head: _Head, tissues: _Tissues) -> np.ndarray:
    """Supine patient: blood settles in the dependent (posterior) part, a fluid level across the ventricle."""
    y = head.y
    vent = tissues.left if les.side < 0 else tissues.right
    mask = tissues.brain & vent & (y > les.level)
    if les.radius > 0:  # cast filling the third ventricle too
        mask |= tissues.brain & tissues.third & (y > les.level - 5.0)
    return mask


def _subarachnoid(les: Lesion, head: _Head, tissues: _Tissues) -> np.ndarray:
    """Blood in the CSF spaces (sulci, rim, cisterns) within a sphere around the centre."""
    near = _ellipsoid(head.q, les.center, (les.radius,) * 3) < 1.0
    return tissues.csf_space & near & ~tissues.ventricles


def _draw_lesions(hu: np.ndarray, head: _Head, tissues: _Tissues, an: Anatomy, lesions: list[Lesion]):
    """Each lesion drawn into `hu` in turn (an intraparenchymal one with its edema first); {subtype: mask}."""
    masks: dict[str, np.ndarray] = {}
    for les in lesions:
        if les.kind in ("epidural", "subdural"):
            mask = _extra_axial(les, head, tissues, an)
        elif les.kind == "intraparenchymal":
            mask, edema = _intraparenchymal(les, head, tissues)
            hu[edema] = HU_EDEMA
        elif les.kind == "intraventricular":
            mask = _intraventricular(les, head, tissues)
        elif les.kind == "subarachnoid":
            mask = _subarachnoid(les, head, tissues)
        else:
            raise ValueError(f"unknown lesion kind {les.kind}")
        hu[mask] = les.hu
        masks[les.kind] = masks[les.kind] | mask if les.kind in masks else mask
    return masks


def _as_stored(hu: np.ndarray, noise_seed: int, noise: float) -> np.ndarray:
    """The scanner's look: partial-volume blur, Gaussian noise, whole HU in the written range (int16)."""
    hu = _smooth(hu)
    rng = np.random.default_rng(noise_seed)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise)
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def _slice_labels(masks: dict[str, np.ndarray], slices: int) -> np.ndarray:
    """(S, 6) int8 in LABELS order: a slice is positive for a subtype when its mask has a pixel in it; `any` if any."""
    labels = np.zeros((slices, len(LABELS)), np.int8)
    for kind, mask in masks.items():
        labels[:, LABELS.index(kind)] = mask.any(axis=(1, 2))
    labels[:, 0] = labels[:, 1:].max(axis=1)
    return labels


def render(geom: Geometry, an: Anatomy, lesions: list[Lesion], noise_seed: int, noise: float = 3.0) -> Rendered:
    """HU volume of one study plus the mask and per-slice labels of every subtype."""
    head = _head_frame(geom, an)
    hu, skull = _scalp_and_skull(head, an)
    brain = head.r_inner < 1.0
    base = _skull_base(hu, head, an)
    skull = skull | base
    brain = brain & ~base
    sulci, grey = _sulci_and_grey(head, an, brain)
    rim = brain & (head.depth <= 1.8)  # subarachnoid CSF over the convexity
    _parenchyma(hu, head, an, brain, grey)
    csf_space = sulci | rim | _basal_cisterns(head, an, brain)
    hu[csf_space] = HU_CSF
    left, right, third = ventricle_masks(head.q, an)
    ventricles = brain & (left | right | third)
    hu[ventricles] = HU_CSF
    tissues = _Tissues(brain, csf_space, left, right, third, ventricles)
    masks = _draw_lesions(hu, head, tissues, an, lesions)
    regions = {"skull": skull, "brain": brain, "ventricles": ventricles, "csf_space": csf_space & ~ventricles}
    return Rendered(
        hu=_as_stored(hu, noise_seed, noise), masks=masks, labels=_slice_labels(masks, geom.slices), regions=regions
    )
