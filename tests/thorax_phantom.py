"""A synthetic thorax and upper abdomen for the anatomy steps (test helper).

Body (soft tissue in a rim of fat), spine on the midline behind, two lungs (parenchyma at
-850 HU, or -930 HU "emphysema") with vessels, rising from diaphragm domes, a trachea on the
midline from the top slice forking at the carina into two main bronchi that run into the
lungs, and bowel gas (a stomach bubble, a colon segment) below the diaphragm; air around.
LPS axes: i -> +x (patient left), j -> +y (posterior), k -> +z (superior).
"""

from __future__ import annotations

import numpy as np

from node.pipeline.volume import SeriesInfo, Volume


def thorax(spacing: tuple[float, float, float] = (1.5, 1.5, 3.0), seed: int = 0, lung_hu: float = -850,
           trachea: bool = True) -> tuple[Volume, dict[str, np.ndarray]]:
    si, sj, sk = spacing
    nz, ny, nx = int(300 / sk), int(260 / sj), int(360 / si)
    z = (np.arange(nz) * sk)[:, None, None]  # mm above the lowest slice
    y = (np.arange(ny) * sj - 130)[None, :, None]
    x = (np.arange(nx) * si - 180)[None, None, :]
    rng = np.random.default_rng(seed)
    hu = np.full((nz, ny, nx), -1000.0)
    body = (x / 160) ** 2 + (y / 115) ** 2 <= 1
    hu[np.broadcast_to(body, hu.shape)] = 40
    fat = body & ((x / 160) ** 2 + (y / 115) ** 2 > 0.85)
    hu[np.broadcast_to(fat, hu.shape)] = -100
    hu[np.broadcast_to((x ** 2 + (y - 70) ** 2) <= 18 ** 2, hu.shape)] = 500  # the spine
    truth: dict[str, np.ndarray] = {}
    lungs = np.zeros(hu.shape, dtype=bool)
    for side, name in ((1, "lung_left"), (-1, "lung_right")):
        cx = side * 75
        dome = 100 + 0.3 * np.abs(x - cx)  # the diaphragm, lowest at the sides
        lung = (((x - cx) / 55) ** 2 + ((y - 5) / 85) ** 2 <= 1) & (z >= dome)
        lungs |= lung
        truth[name] = lung
    hu[lungs] = lung_hu
    for _ in range(40):  # vessels
        vx, vy = rng.uniform(-120, 120), rng.uniform(-60, 60)
        hu[((x - vx) ** 2 + (y - vy) ** 2 <= rng.uniform(2, 4) ** 2) & lungs] = 40
    airways = np.zeros(hu.shape, dtype=bool)
    if trachea:
        tube = (x ** 2 + (y - 25) ** 2 <= 9 ** 2) & (z >= 220)  # 18 mm across, carina at 220 mm
        bronchi = np.zeros(hu.shape, dtype=bool)
        for side in (-1, 1):  # 12 mm bronchi, 45 degrees down and out
            bronchi |= ((x - side * (220 - z)) ** 2 + (y - 25) ** 2 <= 6 ** 2) & (z <= 222) & (z >= 170)
        hu[tube | bronchi] = -1000
        airways = tube | (bronchi & ~lungs)
    truth["airways"] = airways
    stomach = (x - 60) ** 2 + (y + 40) ** 2 + (z - 60) ** 2 <= 35 ** 2
    colon = ((x + 90) ** 2 + (y + 50) ** 2 <= 15 ** 2) & (z >= 10) & (z <= 80)
    gas = (stomach | colon) & ~lungs
    hu[gas] = -1000
    truth["gas"] = gas
    hu += rng.normal(0, 15, hu.shape)
    affine = np.diag([si, sj, sk, 1.0])
    affine[:3, 3] = [-180, -130, 0]
    info = SeriesInfo("2.25.1", "2.25.2", None, "CT")
    return Volume(np.clip(hu, -1024, 3071).astype(np.int16), affine, info, []), truth
