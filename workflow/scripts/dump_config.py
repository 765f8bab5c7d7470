"""Write the effective configuration (config/config.yaml, overlays, --config, schema defaults)
as YAML: shown in the report and given to the nested `snakemake --report`."""
import json
import sys

import yaml

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import start_log  # noqa: E402
from dyvedeep.io_utils import write_text_atomic  # noqa: E402

start_log(snakemake)  # noqa: F821
config = json.loads(snakemake.params.config)  # noqa: F821
text = (
    "# The effective configuration of this run (config/config.yaml + overlays + --config,\n"
    "# with the schema's defaults filled in).\n"
    + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
)
write_text_atomic(snakemake.output[0], text)  # noqa: F821
