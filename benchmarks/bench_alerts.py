"""Benchmark: alert packaging and serialization with cutouts on one core (issue 7: >= 2,000/s).

One 2048x4096 visit-detector: difference, science and a template on its own grid (TAN-SIP WCS),
2,000 associated DiaSources with a realistic footprint size mix (median bboxSize ~20 px, so most
cutouts are 30x30 and some reach 102x102), each object with 5 earlier DiaSources and 10 earlier
DiaForcedSources. Timed: ``build_alerts`` (cutouts, Avro encoding, read-back check of every
packet) plus ``write_avro`` of the visit-detector's file. Baseline in the same session: the
straightforward path for the same alerts, packet dicts through lsst-alert-packet's
``Schema.validate`` + ``Schema.serialize`` with cutouts written by astropy ``CCDData.write``
(timed on 200 alerts, reported per second).

Run:  python benchmarks/bench_alerts.py
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_associate import run_worker

N, SHAPE = 2000, (4096, 2048)


def scene(seed: int = 3):
    import pandas as pd
    from astropy.wcs import WCS, Sip

    from apqa.datamodel import Exposure, MoffatPsf, PhotoCalib, VisitInfo
    from apqa.datamodel.apdb_schema import conform, empty_table, load_apdb_schema

    rng = np.random.default_rng(seed)

    def exposure(shift: float) -> Exposure:
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        wcs.wcs.crval = [150.0, 2.0]
        wcs.wcs.crpix = [1024.5 + shift, 2048.5 - shift]
        wcs.wcs.cd = [[-0.263 / 3600, 0.0], [0.0, 0.263 / 3600]]
        a = np.zeros((4, 4))
        a[2, 0] = 1e-7
        wcs.sip = Sip(a, a.T.copy(), None, None, wcs.wcs.crpix)
        return Exposure(rng.normal(0, 5, SHAPE).astype(np.float32), np.full(SHAPE, 25.0),
                        psf=MoffatPsf(SHAPE[1], SHAPE[0], [4.0]), wcs=wcs,
                        photo_calib=PhotoCalib.from_zero_point(28.0),
                        visit_info=VisitInfo(20, 1, "g", "g", 60100.0, 30.0))

    difference, science, template = exposure(0.0), exposure(0.0), exposure(2.5)

    def filled(name: str, n: int):
        table = empty_table(name, n)
        for col in load_apdb_schema()[name].columns:
            if col.dtype.startswith("float"):
                table[col.name] = rng.normal(1e3, 1e2, n)
            elif col.dtype in ("bool", "boolean"):
                table[col.name] = rng.random(n) < 0.1
        return table

    src = filled("DiaSource", N)
    src["diaSourceId"] = 20 * 10**8 + 10**5 + np.arange(N)
    src["visit"], src["detector"], src["band"] = 20, 1, "g"
    src["midpointMjdTai"] = 60100.0
    src["x"] = rng.uniform(0, SHAPE[1] - 1, N)
    src["y"] = rng.uniform(0, SHAPE[0] - 1, N)
    src["ra"], src["dec"] = difference.pixel_to_sky(src["x"], src["y"])
    src["bboxSize"] = np.clip(rng.lognormal(np.log(20), 0.5, N), 5, 200).astype(int)
    src["reliabilityVersion"] = "rb-1.0"
    src["diaObjectId"] = pd.array(np.arange(N) + 1, dtype="Int64")
    src["ssObjectId"] = src["parentDiaSourceId"] = pd.NA
    obj = filled("DiaObject", N)
    obj["diaObjectId"], obj["ra"], obj["dec"] = np.arange(N) + 1, src["ra"], src["dec"]
    hist = pd.concat([src.assign(diaSourceId=src["diaSourceId"] - k * 10**8, visit=20 - k,
                                 midpointMjdTai=60100.0 - 3 * k) for k in range(1, 6)])
    forced = filled("DiaForcedSource", 10 * N)
    forced["diaForcedSourceId"] = np.arange(10 * N)
    forced["diaObjectId"] = np.tile(np.arange(N) + 1, 10)
    forced["visit"], forced["detector"], forced["band"] = 19, 1, "g"
    forced["midpointMjdTai"] = 60100.0 - np.repeat(np.arange(1, 11), N)
    forced["ra"], forced["dec"] = np.tile(src["ra"], 10), np.tile(src["dec"], 10)
    return (difference, science, template, conform(src, "DiaSource"), conform(obj, "DiaObject"),
            conform(hist, "DiaSource"), conform(forced, "DiaForcedSource"))


def baseline(batch, exposures, src, n: int = 200) -> float:
    """Alerts per second through lsst-alert-packet dicts and CCDData cutouts."""
    from astropy.nddata import CCDData, VarianceUncertainty
    from lsst.alert.packet import Schema

    schema = Schema.from_uri()
    packets = batch.packets()[:n]
    start = time.perf_counter()
    for packet, (_, row) in zip(packets, src.iloc[:n].iterrows(), strict=False):
        size = int(np.clip(row["bboxSize"], 30, 102))
        for key, exp in zip(("cutoutDifference", "cutoutScience", "cutoutTemplate"), exposures,
                            strict=True):
            x0, y0 = int(row["x"]) - size // 2, int(row["y"]) - size // 2
            sl = (slice(max(y0, 0), y0 + size), slice(max(x0, 0), x0 + size))
            scale = exp.photo_calib.calibration_mean
            cut = CCDData(exp.image[sl] * scale, unit="nJy", wcs=exp.wcs[sl],
                          mask=exp.mask.array[sl] != 0,
                          uncertainty=VarianceUncertainty(exp.variance[sl] * scale**2))
            buffer = io.BytesIO()
            cut.write(buffer, format="fits")
            packet[key] = buffer.getvalue()
        assert schema.validate(packet)
        schema.serialize(packet)
    return n / (time.perf_counter() - start)


def worker() -> None:
    from apqa.pipeline.alert_publish import write_avro
    from apqa.pipeline.alerts import build_alerts

    difference, science, template, src, obj, hist, forced = scene()
    build_alerts(src.iloc[:50], obj, difference, science, template)  # imports, schema parse
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        batch = build_alerts(src, obj, difference, science, template, history=hist,
                             forced_history=forced)
        built = time.perf_counter() - start
        write_avro(Path(tmp) / "alerts_20_1.avro", batch.bodies)
        total = time.perf_counter() - start
    rate_base = baseline(batch, (difference, science, template), src)
    sizes = [len(b) for b in batch.bodies]
    print(json.dumps({"alerts": len(batch), "build_s": built, "total_s": total,
                      "mean_bytes": float(np.mean(sizes)), "baseline_per_s": rate_base}))


def main() -> None:
    if "--worker" in sys.argv:
        worker()
        return
    numbers, wall, rss = run_worker(__file__)
    rate = numbers["alerts"] / numbers["total_s"]
    print(f"alert packaging + serialization + Avro file, {numbers['alerts']} alerts with 3 "
          f"cutouts each (mean packet {numbers['mean_bytes'] / 1e3:.0f} kB), one core")
    print(f"  apqa: {rate:,.0f} alerts/s ({numbers['build_s']:.2f} s build + encode + check, "
          f"{numbers['total_s']:.2f} s with the file)  (target >= 2,000/s)")
    print(f"  baseline lsst-alert-packet + CCDData.write: {numbers['baseline_per_s']:,.0f} "
          f"alerts/s -> apqa x{rate / numbers['baseline_per_s']:.0f}")
    print(f"  whole process (scene of 3 full exposures, run, baseline): {wall:.1f} s, "
          f"peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
