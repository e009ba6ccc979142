rule aggregate:
    input:
        **{table: per_job_files(table) for table in TABLES},
    output:
        dataset_manifest(),
    log:
        f"{LOGS}/aggregate.log",
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        dataset_dir=lambda wildcards, output: os.path.dirname(output[0]),
        tables=list(TABLES),
    script:
        "../scripts/aggregate.py"


rule plot_trajectory:
    input:
        dataset_manifest(),
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


# One rule per summary figure of the whole dataset (qtraj.plotting.SUMMARY_FIGURES), each with its caption.
for _figure in summary_figures(config):

    rule:
        name:
            f"plot_{_figure}"
        input:
            dataset_manifest(),
        output:
            report(
                f"{RESULTS}/figures/{_figure}.png",
                caption=f"../report/{_figure}.rst",
                category="Summary",
            ),
        log:
            f"{LOGS}/plot_{_figure}.log",
        localrule: True
        conda:
            "../envs/qtraj.yaml"
        params:
            results_dir=lambda wildcards, input: os.path.dirname(os.path.dirname(input[0])),
            figure=_figure,
        script:
            "../scripts/plot_summary.py"


# The headline numbers: `qtraj science-check` on the dataset, which report/workflow.rst shows first.
rule science_check:
    input:
        dataset_manifest(),
    output:
        report(
            f"{RESULTS}/science_check.txt",
            caption="../report/science_check.rst",
            category="Headline numbers",
        ),
    log:
        f"{LOGS}/science_check.log",
    localrule: True
    params:
        results_dir=lambda wildcards, input: os.path.dirname(os.path.dirname(input[0])),
    run:
        from qtraj.science import report as science_check

        with open(output[0], "w") as text:
            text.write(science_check(params.results_dir) + "\n")
