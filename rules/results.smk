rule aggregate:
    input:
        results=quantized_evals(),
        fp_evals=fp_evals(),
        training_log=training_logs(),
    output:
        dataset_tables(),
    log:
        f"{LOGS}/aggregate.log",
    params:
        dataset_dir=f"{RESULTS}/dataset",
    localrule: True
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
    params:
        results_dir=RESULTS,
    localrule: True
    script:
        "../scripts/plot_trajectory.py"
