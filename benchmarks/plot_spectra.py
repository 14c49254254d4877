"""Singular spectra of several models' STS-B dev embeddings in one PNG (SimCSE section 5).

    PYTHONPATH=. python benchmarks/plot_spectra.py OUT.png LABEL=MODEL_DIR [LABEL=MODEL_DIR ...]

MODEL_DIR may be "default" for all-MiniLM-L6-v2. Prints each model's alignment,
uniformity, top-1 energy and effective rank; the spectra also go to OUT.json.
"""

import json
import sys
from pathlib import Path

from fastcl import load_encoder
from fastcl.evaluate import default_data_dir, embedding_geometry, load_stsb_split
from fastcl.metrics import plot_spectra


def main(out: str, specs: list[str]) -> None:
    dev = load_stsb_split(default_data_dir() / "sts" / "STSBenchmark" / "sts-dev.csv")
    spectra = {}
    for spec in specs:
        label, _, model = spec.partition("=")
        enc = load_encoder(None if model == "default" else model, verbose=False)
        g = embedding_geometry(lambda s: enc.encode(s, batch_size=128), dev)
        spectra[label] = g["spectrum"]["normalized"]
        print(f"{label}: alignment {g['alignment']:.4f}, uniformity {g['uniformity']:.4f}, "
              f"top-1 energy {g['spectrum']['top1_energy']:.4f}, effective rank {g['spectrum']['effective_rank']:.1f}")
    plot_spectra(spectra, Path(out), title="STS-B dev embeddings: singular spectrum")
    Path(out).with_suffix(".json").write_text(json.dumps(spectra))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
