# Steps 2-3 and the fan-in / fan-out / final transfers: every hand-off between sites, in
# pieces (multisite.flow.workflow_pieces: raws per chunk of the first site stage). A piece's
# marker is written where it arrives; a site instance sending to another instance writes a
# "sent" marker per piece, and one per hand-off and site once every piece is sent.


rule handoff:
    input:
        unpack(handoff_inputs),
    output:
        marker=LAYOUT.handoff_marker("{handoff}", "{site}", "{piece}"),
    log:
        LAYOUT.handoff_log("{handoff}", "{site}", "{piece}"),
    priority: handoff_priority
    # Rucio moves the files and the rule imports them in place: submit-host work.
    # The butler backend copies the files: batch work.
    localrule: campaign.transfer_backend == "rucio"
    script:
        "../scripts/handoff.py"


rule send_handoff:
    input:
        unpack(sending_inputs),
    output:
        marker=LAYOUT.sent_marker("{handoff}", "{site}", "{piece}"),
    log:
        LAYOUT.send_log("{handoff}", "{site}", "{piece}"),
    priority: handoff_priority
    localrule: True
    script:
        "../scripts/send_handoff.py"


# What a waiting receive holds back for: one input per earlier hand-off and far-end site.
rule handoff_sent:
    input:
        pieces=sent_markers,
    output:
        marker=LAYOUT.handoff_sent_marker("{handoff}", "{site}"),
    log:
        LAYOUT.rule_log("handoff_sent", "{handoff}", "{site}"),
    priority: handoff_priority
    localrule: True
    script:
        "../scripts/handoff_sent.py"


rule verify_inputs:
    input:
        placement=ancient(LAYOUT.placement_table),
        raws=LAYOUT.handoff_marker("raws", "{site}", "{piece}"),
    output:
        marker=LAYOUT.inputs_marker("{site}", "{piece}"),
    log:
        LAYOUT.rule_log("verify_inputs", "{site}", "{piece}"),
    priority: TARGETS.handoff_priority("raws")
    script:
        "../scripts/verify_inputs.py"
