# Steps 2-3 and the fan-in / fan-out / final transfers: every hand-off between sites.
# A hand-off's marker is written where it arrives; a site instance sending to another
# instance writes a "sent" marker.


rule handoff:
    input:
        unpack(handoff_inputs),
    output:
        marker=LAYOUT.handoff_marker("{handoff}", "{site}"),
    log:
        LAYOUT.handoff_log("{handoff}", "{site}"),
    # Rucio moves the files and the rule imports them in place: submit-host work.
    # The butler backend copies the files: batch work.
    localrule: campaign.transfer_backend == "rucio"
    script:
        "../scripts/handoff.py"


rule send_handoff:
    input:
        unpack(sending_inputs),
    output:
        marker=LAYOUT.sent_marker("{handoff}", "{site}"),
    log:
        LAYOUT.send_log("{handoff}", "{site}"),
    localrule: True
    script:
        "../scripts/send_handoff.py"


rule verify_inputs:
    input:
        placement=LAYOUT.placement_table,
        raws=LAYOUT.handoff_marker("raws", "{site}"),
    output:
        marker=LAYOUT.inputs_marker("{site}"),
    log:
        LAYOUT.rule_log("verify_inputs", "{site}"),
    script:
        "../scripts/verify_inputs.py"
