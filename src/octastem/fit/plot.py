"""Figure of a column fit: the image with the fitted 2-sigma ellipses, coloured by ellipticity."""

from __future__ import annotations

import numpy as np
import pandas as pd

from octastem.io import atomic_path


def plot_model(image, sampling_A, df: pd.DataFrame, path, title: str | None = None) -> None:
    """Save a PNG of ``image`` with the fitted 2-sigma ellipses, coloured by ellipticity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    img = np.asarray(image, dtype=float)
    s = float(sampling_A)
    ny, nx = img.shape
    fig, ax = plt.subplots(figsize=(6, 6 * ny / nx + 0.3), dpi=120)
    ax.imshow(img, cmap="gray", origin="upper", extent=(-s / 2, (nx - 0.5) * s, (ny - 0.5) * s, -s / 2))
    ok = df[df["success"].astype(bool)] if "success" in df else df
    vals = ok["ellipticity"].to_numpy(dtype=float)
    vmax = max(1.05, float(np.nanmax(vals))) if vals.size else 1.5
    norm = matplotlib.colors.Normalize(vmin=1.0, vmax=vmax)
    cmap = matplotlib.colormaps["viridis"]
    for row in ok.itertuples():
        ax.add_patch(
            Ellipse(
                (row.x, row.y),
                4 * row.sigma_major,
                4 * row.sigma_minor,
                angle=row.angle_deg,
                fill=False,
                lw=1.2,
                color=cmap(norm(row.ellipticity)),
            )
        )
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="ellipticity (major/minor)", fraction=0.046, pad=0.04)
    ax.set_xlabel("x (A)")
    ax.set_ylabel("y (A)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
