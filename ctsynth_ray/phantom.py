"""Procedural thoracic CT phantoms: built-in data for users with no CT of their own.

A phantom is an axial chest CT at 0.48828125 x 0.48828125 x 1 mm in HU: air around the body, skin,
subcutaneous fat, chest-wall muscle, ribs / spine / sternum (cortical shell > 700 HU, marrow lower),
mediastinal fat, heart, aorta, trachea and main bronchi, oesophagus, liver and spleen under the
diaphragm domes, textured lungs with a branching vessel tree and airways, and 0 to 3 nodules (sizes
from the LIDC distribution, solid / part-solid / ground glass, round, lobulated or spiculated, with
partial-volume edges), blurred by a scanner PSF and overlaid with correlated noise.

The anatomy is laid out relative to the field of view, so the grid's shape sets the patient's size:
the default 256 x 192 x 128 voxels is a small (125 x 94 x 128 mm) chest, ``640 x 480 x 320`` an adult
one. Nodule sizes are real millimetres. Volume ``index`` of seed ``seed`` depends on nothing else:
its random generator is ``numpy.random.default_rng((seed, index))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ctsynth_ray.dataset import TARGET_SPACING_MM, Volume, centred_affine
from ctsynth_ray.lidc_sizes import LOBULATED_SHARE, SPICULATED_SHARE, TEXTURE_SHARE, sample_diameter_mm

#: HU of each tissue (means; texture and noise are added around them).
HU = {
    "air": -1000.0,
    "lung": -845.0,
    "fat": -100.0,
    "skin": 30.0,
    "muscle": 50.0,
    "blood": 40.0,
    "myocardium": 45.0,
    "liver": 58.0,
    "spleen": 48.0,
    "csf": 10.0,
    "disc": 80.0,
    "cartilage": 110.0,
    "cortical_bone": 1250.0,
    "marrow": 260.0,
    "bowel_gas": -900.0,
    "airway": -1000.0,
    "nodule": 35.0,
}
TISSUES = tuple(HU)
GROUND_GLASS_HU = -500.0  # ground-glass nodules and the halo of part-solid ones

# Adult chest half-width (mm); anatomy sizes below are adult millimetres scaled by body size / this.
_ADULT_HALF_WIDTH_MM = 170.0
NODULE_COUNT_PROBABILITIES = (0.2, 0.45, 0.23, 0.12)  # 0, 1, 2, 3 nodules; about 20 % have none


@dataclass(frozen=True)
class PhantomConfig:
    """What a phantom looks like. ``shape`` in voxels (x, y, z); ``spacing_mm`` per axis."""

    shape: tuple[int, int, int] = (256, 192, 128)
    spacing_mm: tuple[float, float, float] = TARGET_SPACING_MM
    noise_hu: float = 18.0
    max_nodules: int = 3
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0)

    def __post_init__(self):
        if len(self.shape) != 3 or min(self.shape) < 32:
            raise ValueError(f"shape must be three sizes of at least 32 voxels, got {self.shape}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be three positive sizes, got {self.spacing_mm}")
        if not 0 <= self.max_nodules <= 3:
            raise ValueError(f"max_nodules must be 0 to 3, got {self.max_nodules}")
        low, high = self.nodule_diameter_mm
        if not 0 < low <= high:
            raise ValueError(f"nodule_diameter_mm must be 0 < low <= high, got {self.nodule_diameter_mm}")


@dataclass
class PlacedNodule:
    """A nodule as drawn: centre (voxel indices), diameter (mm), texture, shape and where it sits."""

    center_vox: tuple[float, float, float]
    diameter_mm: float
    texture: str  # solid | part_solid | ground_glass
    shape: str  # round | lobulated | spiculated
    site: str  # interior | pleural | vascular


@dataclass
class _Tubes:
    """Accumulates tube-shaped structures (vessels, airways) as partial-volume fractions."""

    shape: tuple[int, int, int]
    spacing: np.ndarray
    fraction: np.ndarray = field(init=False)
    segments: list = field(default_factory=list)

    def __post_init__(self):
        self.fraction = np.zeros(self.shape, np.float32)

    def add(self, p0_mm: np.ndarray, p1_mm: np.ndarray, radius_mm: float) -> None:
        """Add a cylinder with round ends from p0 to p1 (mm in grid coordinates: index x spacing)."""
        self.segments.append((p0_mm, p1_mm, radius_mm))
        margin = radius_mm + self.spacing.max()
        lo = np.floor((np.minimum(p0_mm, p1_mm) - margin) / self.spacing).astype(int)
        hi = np.ceil((np.maximum(p0_mm, p1_mm) + margin) / self.spacing).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return
        grids = [np.arange(lo[a], hi[a], dtype=np.float32) * self.spacing[a] for a in range(3)]
        px, py, pz = grids[0][:, None, None], grids[1][None, :, None], grids[2][None, None, :]
        d = p1_mm - p0_mm
        length2 = float(d @ d) or 1e-9
        t = ((px - p0_mm[0]) * d[0] + (py - p0_mm[1]) * d[1] + (pz - p0_mm[2]) * d[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt(
            (px - p0_mm[0] - t * d[0]) ** 2 + (py - p0_mm[1] - t * d[1]) ** 2 + (pz - p0_mm[2] - t * d[2]) ** 2
        )
        frac = np.clip((radius_mm - dist) / self.spacing[0] + 0.5, 0.0, 1.0)
        view = self.fraction[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(view, frac, out=view)


class _Anatomy:
    """Normalised coordinates of one phantom: u = x / half-width, v = y / half-depth, t = height 0..1."""

    def __init__(self, config: PhantomConfig, rng: np.random.Generator, outline_rng: np.random.Generator):
        self.config = config
        self.rng = rng
        self.shape = config.shape
        self.spacing = np.asarray(config.spacing_mm, float)
        extent = np.asarray(self.shape) * self.spacing
        # Per-patient variation of build: width fills 86-94 % of the field, depth 66-76 % of the width.
        self.half_width = extent[0] / 2 * rng.uniform(0.86, 0.94)
        self.half_depth = min(extent[1] / 2 * 0.94, self.half_width * rng.uniform(0.66, 0.76))
        self.scale = self.half_width / _ADULT_HALF_WIDTH_MM
        x = (np.arange(self.shape[0], dtype=np.float32) - (self.shape[0] - 1) / 2) * self.spacing[0]
        y = (np.arange(self.shape[1], dtype=np.float32) - (self.shape[1] - 1) / 2) * self.spacing[1]
        self.u = (x / self.half_width)[:, None, None]  # + towards the patient's right (RAS)
        self.v = (y / self.half_depth)[None, :, None]  # + anterior
        self.t = np.linspace(0.0, 1.0, self.shape[2], dtype=np.float32)[None, None, :]  # 0 bottom, 1 top
        self.theta = np.arctan2(self.v, self.u)  # pi/2 anterior, -pi/2 posterior
        # The body's cross-section is not an ellipse: a superellipse that is round in front and squarer behind (a
        # flat back), with a patient's own low-harmonic wobble; it narrows towards the thoracic inlet. rho is the
        # distance from the centre in units of the outline's radius in that direction and at that height.
        power = 2.0 + 0.9 * np.clip(-np.sin(self.theta), 0, 1) ** 2
        outline = np.power(np.abs(self.u) ** power + np.abs(self.v) ** power, 1 / power)
        wobble = sum(outline_rng.uniform(0.008, 0.025) * np.cos(k * self.theta + outline_rng.uniform(0, 2 * np.pi))
                     for k in (2, 3, 4))  # fmt: skip
        taper = 1.0 - 0.12 * np.clip((self.t - 0.68) / 0.32, 0, 1) ** 2  # (1, 1, z)
        self.rho = (outline / (1.0 + wobble)).astype(np.float32) / taper.astype(np.float32)  # (x, y, z)

    def mm(self, adult_mm: float) -> float:
        """An adult size in mm scaled to this patient (never below one in-plane voxel)."""
        return max(adult_mm * self.scale, float(self.spacing[0]))

    def world(self, u: float, v: float, t: float) -> np.ndarray:
        """Normalised coordinates -> mm in grid coordinates (index x spacing)."""
        extent = (np.asarray(self.shape) - 1) * self.spacing
        return np.array([extent[0] / 2 + u * self.half_width, extent[1] / 2 + v * self.half_depth, t * extent[2]])


def _smooth_noise(rng: np.random.Generator, shape, factor: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-ish, spatially smooth noise: filtered at 1/factor resolution and upsampled."""
    small = [max(2, s // factor + 2) for s in shape]
    noise = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma)
    noise /= noise.std() + 1e-6
    zoomed = ndimage.zoom(noise, [s / n for s, n in zip(shape, small)], order=1)
    return zoomed[: shape[0], : shape[1], : shape[2]]


@dataclass
class Phantom:
    """One phantom: the volume (int16 HU, uint8 mask), its nodules, and the tissue of every voxel before
    blur and noise (uint8 indices into :data:`TISSUES`)."""

    volume: Volume
    nodules: list[PlacedNodule]
    tissues: np.ndarray


def make_phantom(seed: int, index: int, config: PhantomConfig | None = None) -> Phantom:
    """Make phantom ``index`` of run ``seed``.

    Depends only on (seed, index, config).
    """
    config = config or PhantomConfig()
    rng = np.random.default_rng((seed, index))
    # The outline's wobble draws from a stream of its own, (seed, index, 1): the main stream, and with it every
    # nodule's draw, is what it was before the outline had one.
    a = _Anatomy(config, rng, np.random.default_rng((seed, index, 1)))
    u, v, t, rho, theta = a.u, a.v, a.t, a.rho, a.theta
    shape = config.shape
    hu = np.full(shape, HU["air"], np.float32)

    tissues = np.zeros(shape, np.uint8)  # index into TISSUES: the ground truth of what each voxel is

    def paint(region: np.ndarray, tissue: str, texture=0.0) -> None:
        region = np.broadcast_to(region, shape)
        value = np.broadcast_to(np.asarray(HU[tissue] + texture, np.float32), shape)
        np.copyto(hu, value, where=region)
        tissues[region] = TISSUES.index(tissue)

    # 1. Body wall, outside in: skin, subcutaneous fat, muscle. Thicknesses in units of rho.
    fat_in = 0.97 - rng.uniform(0.04, 0.08)
    muscle_in = fat_in - rng.uniform(0.03, 0.05)
    cavity = muscle_in - 0.02  # inner surface of the rib cage
    soft_texture = _smooth_noise(rng, shape, 4, 1.0)
    paint(rho < 1.0, "skin")
    paint(rho < 0.97, "fat", 12 * soft_texture)
    paint(rho < fat_in, "muscle", 6 * soft_texture)
    paint(rho < cavity, "fat", 10 * soft_texture)  # mediastinal fat fills the cavity first
    # Paraspinal muscles, either side of the spine, following its curve.
    spine_curve = -0.05 * np.sin(np.pi * t)
    for side in (-1, 1):
        paint(((u - side * 0.2) / 0.17) ** 2 + ((v + 0.72 - spine_curve) / 0.2) ** 2 < 1, "muscle", 6 * soft_texture)

    # 2. Lungs: inside the rib cage, outside the mediastinum and the spine, above the diaphragm domes.
    dome_right = rng.uniform(0.22, 0.3)  # the right dome sits higher (liver)
    dome_left = dome_right - rng.uniform(0.03, 0.07)
    dome = np.where(u > 0, dome_right, dome_left) - 0.22 * (u**2 + 0.5 * v**2)
    apex = 1.0 - 0.55 * np.clip(rho / cavity, 0, None) ** 4  # lungs narrow towards the apex
    # The mediastinum widens smoothly around the heart (about dome + 0.1) and narrows above it, not a box.
    t_mid = dome_right + 0.1
    med_half_width = 0.15 + 0.13 * np.exp(-(((t - t_mid) / 0.2) ** 2)) * (t > t_mid) + 0.13 * (t <= t_mid)
    mediastinum = ((u + 0.04) / med_half_width) ** 2 + ((v - 0.1) / 0.85) ** 2 < 1
    spine_v = -0.55 - 0.05 * np.sin(np.pi * t)  # the thoracic kyphosis: the spine bows backwards mid-chest
    spine_block = ((u / 0.2) ** 2 + ((v - spine_v + 0.07) / 0.3) ** 2) < 1
    lung = (rho < cavity - 0.01) & ~mediastinum & ~spine_block & (t > dome) & (t < apex)
    lung = ndimage.binary_opening(lung, iterations=2)
    lung_texture = _smooth_noise(rng, shape, 3, 1.0) * 30 + _smooth_noise(rng, shape, 12, 1.0) * 24
    dependent = 45 * np.clip(-v, 0, 1)  # gravity: posterior lung is denser
    paint(lung, "lung", lung_texture + dependent)

    # 3. Under the diaphragm: liver on the right, spleen and stomach on the left.
    abdomen = (rho < cavity) & (t <= dome) & ~spine_block
    paint(abdomen & (u > -0.25), "liver", 6 * soft_texture)
    paint(abdomen & (u <= -0.25), "spleen", 6 * soft_texture)
    stomach = (((u + 0.45) / 0.22) ** 2 + ((v - 0.15) / 0.3) ** 2 < 1) & (t < dome - 0.05)
    paint(stomach, "bowel_gas")

    # 4. Heart and great vessels (tubes in grid mm), oesophagus.
    t_heart = dome_right + rng.uniform(0.08, 0.12)
    heart = (((u + 0.14) / 0.3) ** 2 + ((v - 0.22) / 0.45) ** 2 + ((t - t_heart) / 0.2) ** 2) < 1
    paint(heart & (rho < cavity), "myocardium", 5 * soft_texture)
    chambers = (((u + 0.14) / 0.22) ** 2 + ((v - 0.22) / 0.34) ** 2 + ((t - t_heart) / 0.15) ** 2) < 1
    paint(chambers & (rho < cavity), "blood")
    great = _Tubes(shape, a.spacing)
    r_aorta = a.mm(13)
    arch_t = min(0.9, t_heart + 0.45)
    great.add(a.world(0.05, 0.15, t_heart), a.world(0.05, 0.15, arch_t), r_aorta)  # ascending aorta
    great.add(a.world(0.05, 0.15, arch_t), a.world(-0.12, -0.5, arch_t), r_aorta)  # arch
    great.add(a.world(-0.12, -0.5, arch_t), a.world(-0.12, -0.5, 0.0), r_aorta * 0.85)  # descending
    great.add(a.world(-0.1, 0.3, t_heart + 0.1), a.world(-0.05, 0.05, t_heart + 0.25), a.mm(12))  # pulmonary trunk
    great.add(a.world(0.02, -0.42, 1.0), a.world(0.02, -0.42, 0.0), a.mm(6))  # oesophagus
    paint(great.fraction > 0.5, "blood")

    # 5. Airways: trachea to the carina, main bronchi to the hila, then a few generations in the lungs.
    airways = _Tubes(shape, a.spacing)
    t_carina = min(0.8, arch_t - 0.05)
    carina = a.world(0.0, -0.18, t_carina)
    airways.add(a.world(0.0, -0.18, 1.05), carina, a.mm(9))
    hila = {side: a.world(side * 0.32, -0.1, t_carina - 0.12) for side in (-1, 1)}
    for hilum in hila.values():
        airways.add(carina, hilum, a.mm(6.5))

    # 6. Pulmonary vessels: trees from each hilum into the lung, as partial-volume tubes.
    vessels = _Tubes(shape, a.spacing)
    lung_small = lung[::2, ::2, ::2]

    def inside_lung(point_mm: np.ndarray) -> bool:
        i = np.round(point_mm / a.spacing / 2).astype(int)
        return bool(np.all(i >= 0) and np.all(i < lung_small.shape) and lung_small[tuple(i)])

    def grow(tubes: _Tubes, start, direction, length, radius, depth, min_radius):
        end = start + direction * length
        tubes.add(start, end, radius)
        if depth >= 9 or radius * 0.78 < min_radius:
            return
        for sign in (-1.0, 1.0):
            for _try in range(3):  # a branch that would leave the lung tries another direction
                axis = rng.standard_normal(3)
                axis -= axis @ direction * direction
                axis /= np.linalg.norm(axis) + 1e-9
                angle = np.deg2rad(rng.uniform(20, 45))
                child = direction * np.cos(angle) + sign * axis * np.sin(angle)
                child /= np.linalg.norm(child)
                child_length = length * rng.uniform(0.72, 0.88)
                if inside_lung(end + child * child_length):
                    grow(tubes, end, child, child_length, radius * rng.uniform(0.7, 0.8), depth + 1, min_radius)
                    break

    lung_height_mm = shape[2] * a.spacing[2] * 0.5
    for side, hilum in hila.items():
        # Lobar roots: up, down, forwards, backwards and out, in mm.
        for aim in ((0.5, 0.0, 1.0), (0.5, 0.0, -1.0), (0.6, 0.8, 0.3), (0.6, -0.8, -0.3), (1.0, 0.3, -0.4),
                    (0.8, -0.3, 0.5)):  # fmt: skip
            direction = np.array([side * aim[0] * a.half_width, aim[1] * a.half_depth, aim[2] * lung_height_mm])
            direction += rng.normal(0, 0.1, 3) * np.linalg.norm(direction)
            direction /= np.linalg.norm(direction)
            grow(vessels, hilum, direction, a.mm(34), a.mm(8), 0, 0.3)
        for aim in ((0.5, 0.3, 0.8), (0.6, -0.3, -0.8)):
            direction = np.array([side * aim[0] * a.half_width, aim[1] * a.half_depth, aim[2] * lung_height_mm])
            direction /= np.linalg.norm(direction)
            grow(airways, hilum, direction, a.mm(30), a.mm(5), 1, 0.6)
    in_chest = rho < cavity
    vessel_weight = vessels.fraction * in_chest * ~np.broadcast_to(heart, shape)
    hu += (HU["blood"] - hu) * vessel_weight
    tissues[vessel_weight > 0.5] = TISSUES.index("blood")
    # Airways: a soft-tissue wall (outer shell) around an air lumen.
    wall = np.clip(airways.fraction, 0, 1) * in_chest
    hu += (HU["muscle"] - hu) * wall
    tissues[wall > 0.5] = TISSUES.index("muscle")
    lumen = _Tubes(shape, a.spacing)
    for p0, p1, radius in airways.segments:
        lumen.add(p0, p1, radius * 0.72)
    hu += (HU["air"] - hu) * lumen.fraction * in_chest
    tissues[lumen.fraction * in_chest > 0.5] = TISSUES.index("airway")

    # 7. Bones: ribs (cortex + marrow, cartilage towards the sternum), sternum, vertebrae.
    bone = np.zeros(shape, bool)
    rib_pitch = max(0.05, a.mm(26) / (shape[2] * a.spacing[2]))  # rib spacing in units of t
    rib_height = rib_pitch * 0.45
    rib_phase = rng.uniform(0, rib_pitch)
    # Ribs descend towards the front: height offset grows with sin(theta) (anterior).
    rib_t = t + 0.5 * rib_pitch * (1 + np.sin(theta)) * 1.6 - rib_phase
    in_rib_band = np.mod(rib_t, rib_pitch) < rib_height
    rib_ring = (rho > cavity + 0.005) & (rho < cavity + 0.005 + 0.045)
    anterior_end = np.abs(theta - np.pi / 2) < 0.45
    ribs = rib_ring & in_rib_band & ~anterior_end & (t > 0.04)
    cartilage = rib_ring & in_rib_band & anterior_end & (np.abs(theta - np.pi / 2) > 0.12)
    paint(cartilage, "cartilage")
    bone |= ribs
    sternum = (np.abs(u) < 0.09) & (v > cavity - 0.005) & (v < cavity + 0.06) & (t > 0.3) & (t < 0.92)
    bone |= sternum
    # Vertebrae: each level a body with concave sides (waisted between its end plates), larger further down,
    # on the kyphotic curve; a disc between levels; the arch, with transverse processes and a spinous process
    # in the middle of each level only, so that the column is segmented in every view.
    level_pitch = max(0.06, a.mm(27) / (shape[2] * a.spacing[2]))
    phase = np.mod(t - rng.uniform(0, level_pitch), level_pitch) / level_pitch  # 0..1 within a level
    disc = phase < 0.22
    grow = 1.0 + 0.18 * (1.0 - t)  # lower vertebrae are larger
    waist = 1.0 - 0.14 * np.sin(np.pi * np.clip((phase - 0.22) / 0.78, 0, 1))
    body_v = ((u / (0.13 * grow * waist)) ** 2 + ((v - spine_v) / (0.2 * grow * np.sqrt(waist))) ** 2) < 1
    disc_v = ((u / (0.13 * grow)) ** 2 + ((v - spine_v) / (0.2 * grow)) ** 2) < 1
    back = v - spine_v  # 0 at the body's centre, negative behind it
    canal = ((u / 0.06) ** 2 + ((back + 0.25) / 0.08) ** 2) < 1
    mid_level = (phase > 0.3) & (phase < 0.85)
    arch = ((u / 0.1) ** 2 + ((back + 0.27) / 0.13) ** 2 < 1) | (
        (np.abs(u) < 0.025) & (back < -0.25) & (back > -0.42 + 0.06 * phase) & mid_level
    )
    transverse = (np.abs(u) < 0.24) & (np.abs(back + 0.27) < 0.05) & (phase > 0.4) & (phase < 0.75)
    bone |= body_v & ~disc
    bone |= (arch | transverse) & ~canal
    paint(disc_v & disc, "disc")
    paint(canal, "csf")
    # Cortical shell: bone voxels within ~1 mm of the bone surface; marrow inside.
    cortex_vox = max(1, round(a.mm(1.0) / a.spacing[0]))
    marrow = ndimage.binary_erosion(bone, iterations=cortex_vox)
    paint(bone, "cortical_bone", 40 * soft_texture)
    paint(marrow, "marrow", 25 * soft_texture)

    # 8. Nodules, last so that they replace whatever was there.
    mask = np.zeros(shape, np.uint8)
    nodules = _place_nodules(rng, config, a, lung, vessels, hu, mask)
    tissues[mask > 0] = TISSUES.index("nodule")

    # 9. Scanner: blur (PSF), then correlated noise; quantise to int16 HU.
    # A scanner's in-plane PSF (about 0.5 mm) and the slice profile of 1-2 mm slices (LIDC's are 1-2.5 mm).
    hu = ndimage.gaussian_filter(hu, sigma=(1.0, 1.0, 0.8))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.6)
    hu += noise * (config.noise_hu / (noise.std() + 1e-6))
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    affine = centred_affine(shape, config.spacing_mm)
    volume = Volume(volume_id=f"phantom-s{seed}-{index:05d}", hu=hu, mask=mask, affine=affine)
    return Phantom(volume=volume, nodules=nodules, tissues=tissues)


def _place_nodules(rng, config: PhantomConfig, a: _Anatomy, lung, vessels: _Tubes, hu, mask) -> list[PlacedNodule]:
    count = int(rng.choice(len(NODULE_COUNT_PROBABILITIES), p=NODULE_COUNT_PROBABILITIES))
    count = min(count, config.max_nodules)
    if count == 0 or not lung.any():
        return []
    # Distance to the lung boundary (mm), at half resolution: enough to choose sites.
    lung_small = lung[::2, ::2, ::2]
    depth_mm = ndimage.distance_transform_edt(lung_small, sampling=a.spacing * 2)
    placed: list[PlacedNodule] = []
    textures = list(TEXTURE_SHARE)
    texture_p = np.array(list(TEXTURE_SHARE.values()))
    for _ in range(count):
        diameter = sample_diameter_mm(rng, *config.nodule_diameter_mm)
        site = str(rng.choice(["interior", "pleural", "vascular"], p=[0.7, 0.15, 0.15]))
        centre = None
        for _attempt in range(12):  # shrink the nodule until it fits this patient's lungs
            centre = _choose_site(rng, site, diameter / 2, depth_mm, vessels, a, placed)
            if centre is not None:
                break
            diameter = max(config.nodule_diameter_mm[0], diameter * 0.8)
        if centre is None:
            continue
        spiculated = rng.random() < SPICULATED_SHARE
        lobulated = spiculated or rng.random() < LOBULATED_SHARE
        nodule = PlacedNodule(
            center_vox=tuple(float(c) for c in centre),
            diameter_mm=float(diameter),
            texture=str(rng.choice(textures, p=texture_p / texture_p.sum())),
            shape="spiculated" if spiculated else ("lobulated" if lobulated else "round"),
            site=site,
        )
        _draw_nodule(rng, nodule, a.spacing, hu, mask)
        placed.append(nodule)
    return placed


def _choose_site(rng, site, radius_mm, depth_mm, vessels: _Tubes, a: _Anatomy, placed) -> np.ndarray | None:
    """A nodule centre (voxel indices) for ``site``, or None when no lung is deep enough."""
    if site == "pleural":  # touching the pleura: centre a little less than a radius from the wall
        candidates = np.argwhere((depth_mm > 0.5 * radius_mm) & (depth_mm < 0.9 * radius_mm))
    elif site == "vascular":
        segments = [s for s in vessels.segments if s[2] < radius_mm]
        if not segments:
            return None
        for _ in range(20):
            p0, p1, r_vessel = segments[rng.integers(len(segments))]
            side = rng.standard_normal(3)
            side /= np.linalg.norm(side)
            centre_mm = (p0 + p1) / 2 + side * (radius_mm + 0.5 * r_vessel)
            idx = np.round(centre_mm / a.spacing / 2).astype(int)
            if np.all(idx >= 0) and np.all(idx < depth_mm.shape) and depth_mm[tuple(idx)] >= radius_mm:
                centre = centre_mm / a.spacing
                if _apart(centre, radius_mm, a.spacing, placed):
                    return centre
        return None
    else:
        candidates = np.argwhere(depth_mm >= radius_mm + 1.0)
    for _ in range(20):
        if len(candidates) == 0:
            return None
        centre = (candidates[rng.integers(len(candidates))] * 2 + rng.uniform(0, 2, 3)).astype(float)
        if _apart(centre, radius_mm, a.spacing, placed):
            return centre
    return None


def _apart(centre, radius_mm, spacing, placed: list[PlacedNodule]) -> bool:
    for other in placed:
        gap = np.linalg.norm((np.asarray(other.center_vox) - centre) * spacing)
        if gap < radius_mm + other.diameter_mm / 2 + 2.0:
            return False
    return True


def _draw_nodule(rng, nodule: PlacedNodule, spacing: np.ndarray, hu: np.ndarray, mask: np.ndarray) -> None:
    """Draw one nodule into ``hu`` (partial-volume blend) and ``mask`` (voxels at least half nodule)."""
    radius = nodule.diameter_mm / 2
    reach = radius * (1.9 if nodule.shape == "spiculated" else 1.35) + 2 * spacing.max()
    centre = np.asarray(nodule.center_vox)
    lo = np.maximum(np.floor(centre - reach / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach / spacing).astype(int) + 1, hu.shape)
    if np.any(hi <= lo):
        return
    axes = [(np.arange(lo[k], hi[k]) - centre[k]) * spacing[k] for k in range(3)]
    px, py, pz = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    dist = np.sqrt(px**2 + py**2 + pz**2) + 1e-6
    ux, uy, uz = px / dist, py / dist, pz / dist
    # Surface radius as a function of direction: lobulation is a sum of smooth bumps.
    surface = np.full(dist.shape, radius, np.float32)
    if nodule.shape != "round":
        bumps = rng.standard_normal((6, 3))
        bumps /= np.linalg.norm(bumps, axis=1, keepdims=True)
        lobes = sum(np.exp(-4.0 * (1 - (ux * b[0] + uy * b[1] + uz * b[2]))) for b in bumps) / 6
        surface *= 1 + 0.35 * (lobes - 0.12)
    fraction = np.clip((surface - dist) / spacing[0] + 0.5, 0, 1)
    if nodule.shape == "spiculated":  # thin tapering spikes radiating out of the surface
        for _ in range(int(rng.integers(5, 11))):
            s = rng.standard_normal(3)
            s /= np.linalg.norm(s)
            length = radius * rng.uniform(1.3, 1.9)
            along = np.clip(px * s[0] + py * s[1] + pz * s[2], 0, length)
            off = np.sqrt((px - along * s[0]) ** 2 + (py - along * s[1]) ** 2 + (pz - along * s[2]) ** 2)
            width = max(0.5, 0.12 * radius) * (1 - along / length)
            np.maximum(fraction, np.clip((width - off) / spacing[0] + 0.5, 0, 1), out=fraction)
    if nodule.texture == "solid":
        value = np.float32(HU["nodule"] + rng.normal(0, 8))
    elif nodule.texture == "ground_glass":
        value = np.float32(GROUND_GLASS_HU + rng.normal(0, 60))
    else:  # part-solid: a solid core in a ground-glass halo
        core = np.clip((0.5 * surface - dist) / spacing[0] + 0.5, 0, 1)
        value = GROUND_GLASS_HU + (HU["nodule"] - GROUND_GLASS_HU) * core
    region = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    hu[region] += (value - hu[region]) * fraction
    mask[region] |= (fraction >= 0.5).astype(np.uint8)


def assign_splits(n: int, fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split names for volumes 0..n-1: exact counts by largest remainder, order shuffled by ``seed``.

    Every split with a non-zero fraction gets at least one volume when ``n`` allows.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0, atol=1e-6):
        raise ValueError(f"split fractions (train, val, test) must be >= 0 and sum to 1, got {fractions}")
    exact = np.asarray(fractions) * n
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts))[: n - counts.sum()]:
        counts[k] += 1
    wanted = [k for k in range(3) if fractions[k] > 0]
    for k in wanted:
        if counts[k] == 0 and n >= len(wanted):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[k] += 1
    names = [name for name, c in zip(("train", "val", "test"), counts) for _ in range(c)]
    # A spawn key keeps this stream apart from the volumes' (seed, index) streams.
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(n)
    return [names[k] for k in order]


def write_phantom(root, seed: int, index: int, config: PhantomConfig, split: str) -> dict:
    """Make phantom ``index`` of ``seed``, write its files under ``root`` and return its manifest row."""
    from ctsynth_ray.dataset import write_volume

    phantom = make_phantom(seed, index, config)
    return write_volume(
        root,
        phantom.volume,
        split=split,
        source="phantom",
        phantom_seed=int(seed),
        phantom_index=int(index),
        nodule_kinds=[f"{n.texture}/{n.shape}/{n.site}" for n in phantom.nodules],
    )
