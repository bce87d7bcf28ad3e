"""The embedded survey datasets: camera, site conditions and sky content of each.

Numbers are chosen to resemble the datasets AP teams process in CI: a DECam HiTS-like
extragalactic g-band field, an HSC COSMOS-like deep i-band field, and a crowded DECam
Galactic-bulge field. They are plain data; :mod:`apqa.sim.survey` turns them into images.
"""

from __future__ import annotations

from dataclasses import dataclass

from apqa.errors import InputError
from apqa.sim.camera import CameraSpec

DECAM = CameraSpec(
    name="DECam-sim", width=2048, height=4096, pixel_scale=0.263,
    gain=4.0, read_noise=7.0, full_well=160_000.0, bias_level=1000.0, gap=200,
)
HSC = CameraSpec(
    name="HSC-sim", width=2048, height=4176, pixel_scale=0.168,
    gain=3.0, read_noise=4.5, full_well=150_000.0, bias_level=1200.0, gap=120,
    distortion_at_1deg=40.0,
)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that distinguishes one embedded dataset from another.

    Magnitudes are AB in the dataset's band; densities are per deg^2.
    """

    name: str
    description: str
    camera: CameraSpec
    band: str
    physical_filter: str
    field_ra: float
    field_dec: float
    exptime: float  # s, science visits
    template_exptime: float  # s, the deeper template visits
    seeing_median: float  # arcsec FWHM, science visits
    seeing_spread: float  # log-normal sigma of the science seeing
    template_seeing: float  # arcsec
    sky_mag: float  # mag / arcsec^2
    zp_e_per_s: float  # AB mag giving 1 e-/s at airmass 1
    extinction: float  # mag per airmass
    first_visit: int
    first_template_visit: int
    mjd_start: float  # first science night
    template_mjd: float  # template epoch
    visits_per_night: int = 4
    night_spacing: float = 2.0  # days
    dither_arcsec: float = 20.0
    psf_beta: float = 3.5
    psf_trunc: float = 4.0  # truncation radius in FWHM
    psf_fwhm_variation: float = 0.04  # fractional FWHM change corner to centre
    psf_shear: float = 0.03  # typical |g| of the PSF
    star_density: float = 4000.0  # stars per deg^2 brighter than star_mag_max
    star_mag_min: float = 14.0
    star_mag_max: float = 24.0
    star_slope: float = 0.18  # d log10 N / dm
    galaxy_density: float = 60_000.0  # galaxies per deg^2 brighter than galaxy_mag_max
    galaxy_mag_min: float = 17.0
    galaxy_mag_max: float = 25.5
    galaxy_slope: float = 0.33
    galaxy_hlr_at_20: float = 0.9  # arcsec, median half-light radius at mag 20
    variable_fraction: float = 0.03
    transient_density: float = 150.0  # transients live during the survey, per deg^2
    hosted_fraction: float = 0.7
    transient_mag_min: float = 20.0
    transient_mag_max: float = 24.0
    asteroid_density: float = 80.0  # per deg^2 per night
    fast_asteroid_fraction: float = 0.1
    asteroid_mag_min: float = 19.0
    asteroid_mag_max: float = 23.5
    cr_rate: float = 0.03  # cosmic rays per cm^2 per s
    streak_probability: float = 0.1  # per visit-detector
    n_bad_columns: int = 3
    refcat_mag_max: float = 20.7  # Gaia-like depth

    @property
    def default_visits(self) -> int:
        return 4


DATASETS: dict[str, DatasetSpec] = {
    "hits-sim": DatasetSpec(
        name="hits-sim",
        description="DECam HiTS-like extragalactic field, g band, 2048x4096 CCDs at 0.263\"/px",
        camera=DECAM, band="g", physical_filter="g DECam SDSS c0001 4720.0 1520.0",
        field_ra=145.2, field_dec=-3.1, exptime=87.0, template_exptime=261.0,
        seeing_median=1.3, seeing_spread=0.15, template_seeing=1.05,
        sky_mag=22.0, zp_e_per_s=26.0, extinction=0.18,
        first_visit=410_001, first_template_visit=400_001,
        mjd_start=61040.1, template_mjd=60680.1, star_mag_min=11.5,
    ),
    "cosmos-sim": DatasetSpec(
        name="cosmos-sim",
        description="HSC COSMOS-like deep field, i band, 2048x4176 CCDs at 0.168\"/px",
        camera=HSC, band="i", physical_filter="HSC-I2",
        field_ra=150.1, field_dec=2.2, exptime=200.0, template_exptime=600.0,
        seeing_median=0.65, seeing_spread=0.15, template_seeing=0.55,
        sky_mag=20.3, zp_e_per_s=28.6, extinction=0.05,
        first_visit=11_690, first_template_visit=1_228,
        mjd_start=61045.5, template_mjd=60685.5,
        visits_per_night=3, dither_arcsec=30.0,
        star_density=10_000.0, star_mag_min=13.0, star_mag_max=25.0,
        galaxy_density=200_000.0, galaxy_mag_max=26.0, galaxy_hlr_at_20=0.8,
        transient_density=300.0, transient_mag_max=25.0,
        asteroid_density=20.0, asteroid_mag_max=24.5,
        refcat_mag_max=22.5,  # a PS1-depth reference: HSC saturates near Gaia's faint end
    ),
    "crowded-sim": DatasetSpec(
        name="crowded-sim",
        description="DECam Galactic-bulge-like crowded field, i band, >= 200,000 stars/deg^2",
        camera=DECAM, band="i", physical_filter="i DECam SDSS c0003 7835.0 1470.0",
        field_ra=270.9, field_dec=-30.0, exptime=60.0, template_exptime=180.0,
        seeing_median=1.1, seeing_spread=0.12, template_seeing=0.95,
        sky_mag=20.5, zp_e_per_s=25.9, extinction=0.08,
        first_visit=520_001, first_template_visit=500_001,
        mjd_start=61150.3, template_mjd=60790.3,
        psf_trunc=3.5,
        star_density=300_000.0, star_mag_min=13.0, star_mag_max=23.0, star_slope=0.25,
        galaxy_density=2_000.0, galaxy_mag_max=23.0,
        variable_fraction=0.02, transient_density=60.0, hosted_fraction=0.0,
        asteroid_density=10.0, refcat_mag_max=20.7,
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """The spec of an embedded dataset; unknown names are an :class:`InputError`."""
    try:
        return DATASETS[name]
    except KeyError:
        raise InputError(
            f"dataset '{name}': unknown; expected one of {', '.join(sorted(DATASETS))}"
        ) from None
