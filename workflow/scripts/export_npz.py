"""Export the preprocessed test images of a benchmark as .npz for a board: the model's own
preprocessing (ONNX metadata `dyvedeep.preprocess`) applied on the host."""
import sys

import onnx

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import start_log  # noqa: E402

from dyvedeep.datasets import export_npz, load_dataset  # noqa: E402
from dyvedeep.metadata_keys import PREPROCESS_KEY  # noqa: E402
from dyvedeep.preprocess import Preprocess  # noqa: E402

start_log(snakemake)  # noqa: F821
sm = snakemake  # noqa: F821
model = onnx.load(sm.input.model, load_external_data=False)
meta = {p.key: p.value for p in model.metadata_props}
if PREPROCESS_KEY not in meta:
    sys.exit(f"{sm.input.model} has no {PREPROCESS_KEY} metadata")
preprocess = Preprocess.from_json(meta[PREPROCESS_KEY])
dataset = load_dataset(sm.params.data, preprocess, mirror=sm.params.mirror or None,
                       limit=sm.params.limit)
export_npz(dataset, sm.output[0])
print(f"{sm.params.data}: {len(dataset)} images -> {sm.output[0]}")
