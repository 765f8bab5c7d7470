"""The shards of a benchmark's test split for sharded evaluation: its number of images (after
the limit) cut into ranges of `eval_shard_size` (dyvedeep.evaluate.image_ranges)."""
import sys
from pathlib import Path

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import start_log  # noqa: E402

from dyvedeep.cli_support import open_dataset  # noqa: E402
from dyvedeep.evaluate import image_ranges  # noqa: E402
from dyvedeep.io_utils import write_json_atomic  # noqa: E402
from dyvedeep.plan import build_plan  # noqa: E402

start_log(snakemake)  # noqa: F821
sm = snakemake  # noqa: F821
plan = build_plan(Path(sm.input.model))
dataset = open_dataset(plan, sm.params.data, sm.params.limit, Path(sm.params.mirror) if sm.params.mirror else None)
ranges = image_ranges(len(dataset), int(sm.params.size))
write_json_atomic(sm.output[0], {"total": len(dataset), "size": int(sm.params.size), "ranges": ranges})
print(f"{sm.params.data}: {len(dataset)} images in {len(ranges)} shard(s) of at most {sm.params.size}")
