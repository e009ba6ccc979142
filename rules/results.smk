rule aggregate:
    input:
        results=quantized_evals(),
        fp_evals=fp_evals(),
        training_log=training_logs(),
        layer_errors=layer_error_tables(),
        sharpness=sharpness_tables(),
        accuracy=accuracy_tables(),
    output:
        dataset_tables(),
    log:
        f"{LOGS}/aggregate.log",
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        dataset_dir=lambda wildcards, output: os.path.dirname(output[0]),
    script:
        "../scripts/aggregate.py"


rule plot_trajectory:
    input:
        dataset_tables(),
    output:
        report(
            f"{RESULTS}/figures/{{run}}.png",
            caption="../report/trajectory.rst",
            category="Trajectories",
            labels={"run": "{run}"},
        ),
    log:
        f"{LOGS}/plot_trajectory/{{run}}.log",
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        results_dir=lambda wildcards, input: os.path.dirname(os.path.dirname(input[0])),
    script:
        "../scripts/plot_trajectory.py"


rule plot_sharpness:
    input:
        dataset_tables(),
    output:
        report(
            f"{RESULTS}/figures/sharpness.png",
            caption="../report/sharpness.rst",
            category="Sharpness",
        ),
    log:
        f"{LOGS}/plot_sharpness.log",
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        results_dir=lambda wildcards, input: os.path.dirname(os.path.dirname(input[0])),
    script:
        "../scripts/plot_sharpness.py"
