# Preflight, the first job of every run: packages, binaries, GPUs, versions, disk and data, in seconds.
# Training takes its report as an `ancient` input: preflight gates the first launch, but re-running it (for
# example after a knob change) never makes training look out of date.


rule preflight:
    input:
        verified=DATA_VERIFIED,
    output:
        f"{RUN_DIR}/preflight.json",
    params:
        config=json.dumps(to_dict(CFG), sort_keys=True),
        data_root=DATA_DIR,
    log:
        f"{RUN_DIR}/logs/preflight.log",
    shell:
        "pgolf preflight --config-json {params.config:q} --data-dir {params.data_root} --json-out {output} > {log} 2>&1"
