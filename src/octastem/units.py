"""Physical constants and unit conversions shared by every stage (one home each)."""

from __future__ import annotations

import math

HC_KEV_A = 12.398419843320026  # h c in keV A
ELECTRON_MC2_KEV = 510.99895069  # electron rest energy in keV


def electron_wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength (A) at kinetic energy ``energy_eV`` (as abTEM's energy2wavelength)."""
    e_keV = float(energy_eV) * 1e-3
    return HC_KEV_A / math.sqrt(e_keV * (2.0 * ELECTRON_MC2_KEV + e_keV))
