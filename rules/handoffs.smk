# Steps 2-3 and the fan-in / fan-out / final transfers: every hand-off between sites.
# A hand-off's marker is written where it arrives; a site instance sending to another
# instance writes a "sent" marker.


rule handoff:
    input:
        unpack(handoff_inputs),
    output:
        marker=f"{MARKERS}/handoff/{{handoff}}/{{site}}.json",
    log:
        f"{LOGS}/handoff/{{handoff}}/{{site}}.log",
    # Rucio moves the files and the rule imports them in place: submit-host work.
    # The butler backend copies the files: batch work.
    localrule: campaign.transfer_backend == "rucio"
    script:
        "../scripts/handoff.py"


rule send_handoff:
    input:
        unpack(sending_inputs),
    output:
        marker=f"{MARKERS}/sent/{{handoff}}/{{site}}.json",
    log:
        f"{LOGS}/send_handoff/{{handoff}}/{{site}}.log",
    localrule: True
    script:
        "../scripts/send_handoff.py"


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
