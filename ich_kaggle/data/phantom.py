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


def render(geom: Geometry, an: Anatomy, lesions: list[Lesion], noise_seed: int, noise: float = 3.0) -> Rendered:
    """HU volume of one study plus the mask and per-slice labels of every subtype."""
    q = geom.head_coords()
    x, y, z = q
    a, b, c = an.axes
    t = an.skull
    inner_axes = (a - t, b - t, c - t)
    r_in = _ellipsoid(q, (0, 0, 0), inner_axes)
    norm_q = np.sqrt(x * x + y * y + z * z)
    depth = norm_q * (1.0 / np.maximum(r_in, 1e-6) - 1.0)  # mm from the inner skull surface along the ray (inside: >0)
    r_out = _ellipsoid(q, (0, 0, 0), an.axes)
    r_skin = _ellipsoid(q, (0, 0, 0), (a + 6.0, b + 6.0, c + 6.0))
    r_fat = _ellipsoid(q, (0, 0, 0), (a + 4.0, b + 4.0, c + 4.0))

    hu = np.full(x.shape, HU_AIR, np.float32)
    hu[r_skin < 1.0] = HU_SKIN
    hu[r_fat < 1.0] = HU_FAT
    skull = (r_out < 1.0) & (r_in >= 1.0)
    to_outer = norm_q * (1.0 / np.maximum(r_out, 1e-6) - 1.0)  # mm to the outer skull surface (inside: >0)
    frac = np.clip(-depth / np.maximum(to_outer - depth, 1e-3), 0.0, 1.0)  # 0 at the inner table, 1 at the outer
    del to_outer
    hu[skull] = (
        1550.0
        - 650.0 * np.sin(np.pi * frac[skull])
        + 120.0 * np.sin(0.11 * x[skull] + 0.07 * y[skull] + 0.05 * z[skull])
    )

    brain = r_in < 1.0
    # skull base: below the floor of the anterior/middle fossae only the temporal lobes and the posterior fossa
    # (cerebellum) remain brain; the rest is bone with the air of the sphenoid sinus and denser petrous ridges
    floor = -0.3 * c
    low = brain & (z < floor)
    ai, bi_, ci = inner_axes
    fossae = (
        (_ellipsoid(q, (0.0, 0.4 * bi_, -0.5 * ci), (0.85 * ai, 0.58 * bi_, 0.45 * ci)) < 1)
        | (_ellipsoid(q, (-0.6 * ai, -0.12 * bi_, floor), (0.42 * ai, 0.5 * bi_, 0.3 * ci)) < 1)
        | (_ellipsoid(q, (0.6 * ai, -0.12 * bi_, floor), (0.42 * ai, 0.5 * bi_, 0.3 * ci)) < 1)
    )
    base = low & ~fossae
    hu[base] = 900.0 + 80.0 * np.sin(0.2 * x[base] + 0.13 * y[base])
    petrous = base & (np.abs(np.abs(x) * 0.6 - (y - 0.12 * bi_)) < 4.0) & (np.abs(x) > 10)
    hu[petrous] = 1700.0
    sinus = base & (_ellipsoid(q, (0.0, -0.3 * bi_, floor - 0.08 * ci), (13.0, 11.0, 9.0)) < 1)
    hu[sinus] = HU_AIR
    skull = skull | base
    brain = brain & ~base
    del low, fossae, base, petrous, sinus
    # sulci: thin radial CSF clefts from the surface inward, wavy over z and of varying depth (brain voxels only)
    xb, yb, zb, db = x[brain], y[brain], z[brain], depth[brain]
    theta = np.arctan2(yb / b, xb / a)
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
    sulci[brain] = (pattern < 0.3) & (db > 1.0) & (db < sulcus_depth)
    rim = brain & (depth <= 1.8)  # subarachnoid CSF over the convexity
    grey = np.zeros_like(brain)
    grey[brain] = (db < 6.0) | ((pattern < 0.75) & (db < sulcus_depth + 4.0))
    del xb, yb, zb, db, theta, pattern, sulcus_depth
    hu[brain] = HU_WHITE
    hu[grey] = HU_GREY
    deep = brain & (
        (_ellipsoid(q, (-14.0, 6.0, 0.05 * c), (7.0, 14.0, 10.0)) < 1)
        | (_ellipsoid(q, (14.0, 6.0, 0.05 * c), (7.0, 14.0, 10.0)) < 1)
    )
    hu[deep] = HU_DEEP_GREY
    falx = brain & (np.abs(x) < 1.0) & (z > 0.05 * c) & ((np.abs(y) > 30.0) | (z > 0.45 * c))
    hu[falx] = HU_FALX
    # basal cisterns: a thin five-pointed star-shaped CSF shell around the midbrain (suprasellar/ambient cisterns)
    rc = _ellipsoid(q, (0.0, 10.0, -0.18 * c), (24.0, 20.0, 9.0))
    near_c = rc < 1.2
    star = np.zeros_like(brain)
    star[near_c] = np.abs(rc[near_c] - 0.8 - 0.15 * np.cos(5 * np.arctan2(x[near_c], -(y[near_c] - 10.0)))) < 0.09
    cistern = brain & star
    del rc, near_c, star
    csf_space = sulci | rim | cistern
    hu[csf_space] = HU_CSF
    left, right, third = ventricle_masks(q, an)
    ventricles = brain & (left | right | third)
    hu[ventricles] = HU_CSF

    masks: dict[str, np.ndarray] = {}
    tangential_r = (a + b + c) / 3.0
    for les in lesions:
        if les.kind in ("epidural", "subdural"):
            u = np.asarray(les.center, np.float64) / np.asarray(inner_axes)
            u /= np.linalg.norm(u)
            cos = (
                x * np.float32(u[0] / inner_axes[0])
                + y * np.float32(u[1] / inner_axes[1])
                + z * np.float32(u[2] / inner_axes[2])
            ) / np.maximum(r_in, 1e-6)
            near = cos > np.cos(min(les.radius / tangential_r, np.pi))
            rho = np.arccos(np.clip(cos[near], -1.0, 1.0)) * tangential_r  # distance along the skull from the centre
            s = rho / les.radius
            if les.kind == "epidural":  # biconvex lens: thickest at the centre, tapering to 0 at the rim
                thick = les.thickness * (1.0 - s**2)
            else:  # crescent: nearly uniform, spread wide, tapering only at its ends
                thick = les.thickness * (1.0 - s**4) * (1.0 + 0.15 * np.sin(3 * s + les.phase))
            mask = np.zeros_like(brain)
            mask[near] = brain[near] & (depth[near] < thick)
        elif les.kind == "intraparenchymal":
            cx, cy, cz = les.center
            ax = [les.radius * m for m in les.axes]
            dx, dy, dz = (x - np.float32(cx)) / ax[0], (y - np.float32(cy)) / ax[1], (z - np.float32(cz)) / ax[2]
            rr = np.sqrt(dx * dx + dy * dy + dz * dz)
            close = rr < 1.35 * 1.18  # the lumps change the radius by at most 18 %
            lumpy = 1.0 + 0.18 * np.sin(3 * np.arctan2(dy[close], dx[close]) + les.phase) * np.cos(
                2 * dz[close] + les.phase
            )
            rr[close] /= lumpy
            edema = brain & (rr >= 1.0) & (rr < 1.35) & ~ventricles
            hu[edema] = HU_EDEMA
            mask = brain & (rr < 1.0)
        elif les.kind == "intraventricular":
            vent = left if les.side < 0 else right
            # supine patient: blood settles in the dependent (posterior) part, a fluid level across the ventricle
            mask = brain & vent & (y > les.level)
            if les.radius > 0:  # cast filling the third ventricle too
                mask |= brain & third & (y > les.level - 5.0)
        elif les.kind == "subarachnoid":
            near = _ellipsoid(q, les.center, (les.radius,) * 3) < 1.0
            mask = csf_space & near & ~ventricles
        else:
            raise ValueError(f"unknown lesion kind {les.kind}")
        hu[mask] = les.hu
        masks[les.kind] = masks[les.kind] | mask if les.kind in masks else mask

    hu = _smooth(hu)
    rng = np.random.default_rng(noise_seed)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise)
    hu = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)

    labels = np.zeros((geom.slices, len(LABELS)), np.int8)
    for kind, mask in masks.items():
        labels[:, LABELS.index(kind)] = mask.any(axis=(1, 2))
    labels[:, 0] = labels[:, 1:].max(axis=1)
    regions = {"skull": skull, "brain": brain, "ventricles": ventricles, "csf_space": csf_space & ~ventricles}
    return Rendered(hu=hu, masks=masks, labels=labels, regions=regions)
