# qtraj: quantization robustness along training trajectories. Logic lives in src/qtraj/ and rules/common.smk.
from snakemake.utils import min_version

min_version("9.20")


# The default config is read only when none is given: Snakemake merges --configfile into the
# `configfile:` directive's dict key by key, which would add the default runs to any other config.
if not config:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/hub.smk"
include: "rules/local.smk"
include: "rules/average.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/results.smk"


rule all:
    default_target: True
    input:
        all_targets(),
