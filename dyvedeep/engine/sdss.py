"""SDSS (spatial significance-driven selection): a conv output is first computed on a coarse
grid; a cell whose grid corners are all below the threshold (after ReLU) is interpolated from
them, the other cells' positions are computed.

Here: the grid geometry and the knob path's step after the grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import _kernels as K
from .counting import sdss_decision_ops, sdss_fill_costs, tally
from .spet import conv_neurons

if TYPE_CHECKING:
    from .conv_plan import ConvPlan

U8 = np.uint8


@dataclass(frozen=True)
class SdssGrid:
    """Static SDSS geometry of one output map: grid rows/cols and each off-grid position's cell."""

    gy: np.ndarray
    gx: np.ndarray
    grid_positions: np.ndarray
    off_positions: np.ndarray
    off_y: np.ndarray
    off_x: np.ndarray
    cell_y: np.ndarray
    cell_x: np.ndarray


def sdss_grid(ho: int, wo: int, stride: int) -> SdssGrid:
    """Grid rows 0, s, 2s, ... plus the last row (likewise columns); every off-grid position
    belongs to the cell whose top-left grid corner precedes it."""
    gy = np.unique(np.r_[np.arange(0, ho, stride), ho - 1]).astype(np.int32)
    gx = np.unique(np.r_[np.arange(0, wo, stride), wo - 1]).astype(np.int32)
    on_y = np.zeros(ho, bool)
    on_y[gy] = True
    on_x = np.zeros(wo, bool)
    on_x[gx] = True
    yy, xx = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    grid = on_y[yy] & on_x[xx]
    grid_positions = np.flatnonzero(grid.ravel()).astype(np.int32)
    off = np.flatnonzero(~grid.ravel()).astype(np.int32)
    off_y, off_x = (off // wo).astype(np.int32), (off % wo).astype(np.int32)
    cell_y = np.minimum(np.searchsorted(gy, off_y, side="right") - 1, len(gy) - 2).astype(np.int32)
    cell_x = np.minimum(np.searchsorted(gx, off_x, side="right") - 1, len(gx) - 2).astype(np.int32)
    return SdssGrid(gy, gx, grid_positions, off, off_y, off_x, cell_y, cell_x)


def cell_corner_max(maps: np.ndarray, grid: SdssGrid) -> np.ndarray:
    """Each cell's largest grid corner, per map (maps x cells), flattened: what SDSS compares
    with its threshold."""
    gy, gx = grid.gy, grid.gx
    corners = np.stack([maps[:, gy[:-1]][:, :, gx[:-1]], maps[:, gy[:-1]][:, :, gx[1:]],
                        maps[:, gy[1:]][:, :, gx[:-1]], maps[:, gy[1:]][:, :, gx[1:]]])
    return corners.max(axis=0).reshape(-1)


def sdss_rest(cp: "ConvPlan", out_g: np.ndarray, src: np.ndarray, tap_off: np.ndarray, wmat: np.ndarray,
              lead: int, margins: np.ndarray | None, bias: np.ndarray, constant: np.ndarray | None,
              panels: np.ndarray, threads: int, count: dict[str, int], nonzeros: np.ndarray | None = None) -> None:
    """After the grid: decide the cells, compute the off-grid positions of significant cells
    (only the positions some map needs are unfolded; each map computes its own) and fill
    the others (``nonzeros``: as for :func:`conv_neurons`)."""
    geom, setting, grid = cp.geom, cp.knobs.sdss, cp.knobs.grid
    maps = out_g.reshape(geom.cout, geom.ho, geom.wo)
    ncells = (len(grid.gy) - 1) * (len(grid.gx) - 1)
    insig = np.empty((geom.cout, len(grid.gy) - 1, len(grid.gx) - 1), U8)
    K.sdss_cells(out=maps, gy=grid.gy, gx=grid.gx, threshold=setting.threshold, insignificant=insig)
    count["overhead_sdss"] += sdss_decision_ops(geom.cout, len(grid.grid_positions), ncells)
    positions, needed, n_needed = K.sdss_union(insignificant=insig, off_positions=grid.off_positions,
                                               cell_y=grid.cell_y, cell_x=grid.cell_x)
    if n_needed:
        conv_neurons(cp, src, tap_off, wmat, lead, margins, bias, constant, positions, needed, out_g, panels, threads,
                     count, nonzeros)
    bilinear = setting.option("sdss", "fill") == "bilinear"
    filled = K.sdss_fill(out=maps, gy=grid.gy, gx=grid.gx, pos_y=grid.off_y, pos_x=grid.off_x, cell_y=grid.cell_y,
                         cell_x=grid.cell_x, insignificant=insig, bilinear=bilinear)
    tally(count, sdss_fill_costs(filled, bilinear, wmat.shape[1], cp.layer.relu))
