# Steps 2-3 and the fan-in / fan-out / final transfers: every hand-off between sites.


rule handoff:
    input:
        unpack(handoff_inputs),
    output:
        marker=f"{MARKERS}/handoff/{{handoff}}/{{site}}.json",
    log:
        f"{LOGS}/handoff/{{handoff}}/{{site}}.log",
    localrule: True
    script:
        "../scripts/handoff.py"


rule verify_inputs:
    input:
        placement=f"{MARKERS}/placement/raws.tsv",
        raws=f"{MARKERS}/handoff/raws/{{site}}.json",
    output:
        marker=f"{MARKERS}/inputs/{{site}}.json",
    log:
        f"{LOGS}/verify_inputs/{{site}}.log",
    script:
        "../scripts/verify_inputs.py"
