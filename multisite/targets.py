"""What an instance runs, and what each of its steps waits for.

The rules' input functions are one-line calls into `Targets`, so the decisions
(which hand-offs this instance sends or only receives, what a waiting receive
holds back for, which stages a chunk depends on) are plain Python that unit tests
reach without Snakemake. Paths come from the `Layout` the rules use (relative to the
directory Snakemake runs in).
"""

from __future__ import annotations

__all__ = ("Targets",)

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import Campaign
from .errors import HandoffError
from .flow import Handoff, HandoffPiece, handoffs, stage_chunks, stage_dependencies, workflow_pieces
from .layout import Layout


@dataclass(frozen=True)
class Targets:
    """The targets and rule inputs of one instance of a campaign.

    Parameters
    ----------
    campaign : `Campaign`
        The campaign, with the instance's site (`None`: one instance runs every site).
    layout : `Layout`
        Where the instance's files are.
    """

    campaign: Campaign
    layout: Layout

    @cached_property
    def handoffs(self) -> dict[str, Handoff]:
        return {handoff.name: handoff for handoff in handoffs(self.campaign)}

    @cached_property
    def processing(self) -> list[str]:
        return [site.name for site in self.campaign.processing_sites]

    @cached_property
    def pieces(self) -> dict[tuple[str, str], list[HandoffPiece]]:
        """The pieces of each hand-off (by name) for each processing site, in order."""
        pieces: dict[tuple[str, str], list[HandoffPiece]] = {}
        for piece in workflow_pieces(self.campaign):
            pieces.setdefault((piece.handoff.name, piece.site), []).append(piece)
        return pieces

    @cached_property
    def piece_of(self) -> dict[tuple[str, str, str], HandoffPiece]:
        """The piece of each hand-off holding each chunk of its cut stage, by (hand-off, site, chunk)."""
        return {
            (handoff, site, chunk): piece
            for (handoff, site), pieces in self.pieces.items()
            for piece in pieces
            for chunk in piece.chunks
        }

    def awaited_pieces(self, handoff: Handoff, site: str, stage: str, chunk: str) -> list[HandoffPiece]:
        """Return the pieces of a hand-off to or from ``site`` that a chunk of ``stage`` waits for.

        Only the hand-off's first consumer waits for pieces: a chunk of the stage the
        hand-off is cut along for its own piece, a central chunk for all of them. A
        later consumer has them through its earlier stages (listing them again made
        DR1's preview spend a third of its time on redundant inputs).
        """
        if stage != handoff.consumers[0]:
            return []
        if handoff.cut_stage == stage:
            return [self.piece_of[(handoff.name, site, chunk)]]
        return self.pieces[(handoff.name, site)]

    # ------------------------------------------------------------------ decisions
    def sends(self, handoff: str, site: str) -> bool:
        """Whether this instance sends hand-off ``handoff`` for processing site ``site`` itself."""
        sender, _ = self.handoffs[handoff].ends(self.campaign, site)
        return self.campaign.runs_here(sender)

    def priority(self, stage: str) -> int:
        """Return the scheduling priority of a job for ``stage`` (or a hand-off cut along it).

        Earlier stages first: everything before the central stage is on the campaign's
        critical path (the fan-in barrier), so a site's first chunk and its raws go
        before a later stage's submit YAML (the demo's step1 at RAL started 80 s late
        behind step3 YAMLs).
        """
        return len(self.campaign.stages) - self.campaign.stages.index(self.campaign.stage(stage))

    def handoff_priority(self, handoff: str) -> int:
        """Return the scheduling priority of a hand-off piece: its cut stage's."""
        return self.priority(self.handoffs[handoff].cut_stage)

    def chunks(self, site: str, stage: str) -> list[str]:
        """Chunk names of a stage at a site (one BPS workflow each)."""
        return list(stage_chunks(self.campaign, site, self.campaign.stage(stage)))

    # ------------------------------------------------------------------ markers
    def stage_marker(self, site: str, stage: str) -> Path:
        """Return the marker of a stage complete at a site (the central site for a central stage)."""
        runner = self.campaign.central.name if self.campaign.stage(stage).is_central else site
        return self.layout.stage_marker(runner, stage)

    def chunk_markers(self, site: str, stage: str) -> list[Path]:
        return [self.layout.chunk_marker(site, stage, chunk) for chunk in self.chunks(site, stage)]

    def handoff_markers(self, handoff: str, site: str) -> list[Path]:
        """Return the markers of every piece of a hand-off for a processing site."""
        return [self.layout.piece_marker(p) for p in self.pieces[(handoff, site)]]

    def survey_marker(self) -> Path:
        """Return the demo survey marker when the config has a demo section, else the central repo's."""
        if self.campaign.demo:
            return self.layout.survey_marker()
        return self.layout.repo_marker(self.campaign.central.name)

    # ------------------------------------------------------------------ rule inputs
    def piece(self, handoff: str, site: str, name: str) -> HandoffPiece:
        """Return a hand-off's piece for a processing site, by name; refuse one the plan does not have."""
        pieces = {piece.name: piece for piece in self.pieces.get((handoff, site), [])}
        if name not in pieces:
            raise HandoffError(
                f"Hand-off {handoff}/{site} has no piece {name!r} in this campaign's plan "
                f"(its pieces: {', '.join(pieces) or 'none'}); ask for one of them."
            )
        return pieces[name]

    def producers(self, piece: HandoffPiece) -> dict[str, Path]:
        """Return what a hand-off piece's data comes from (``<stage> [<chunk>] at <site>``), and its marker.

        A piece to the central site comes from its own chunks of the stage it is cut
        along, and the site's earlier producing stages; a fan-out from the central stages.
        """
        flow = piece.handoff
        sender, _ = flow.ends(self.campaign, piece.site)
        earlier = flow.producers[:-1] if flow.to_central else flow.producers
        found = {}
        for stage in earlier:
            runner = self.campaign.central.name if self.campaign.stage(stage).is_central else sender
            found[f"{stage} at {runner}"] = self.stage_marker(sender, stage)
        if flow.to_central:
            for chunk in piece.chunks:
                found[f"{flow.cut_stage} {chunk} at {sender}"] = self.layout.chunk_marker(
                    sender, flow.cut_stage, chunk
                )
        return found

    def sending_inputs(self, handoff: str, site: str, piece: str) -> dict[str, Path | list[Path]]:
        """Return what sending a hand-off piece waits for: the placement, the source repo, its producers."""
        sender, _ = self.handoffs[handoff].ends(self.campaign, site)
        return {
            "placement": self.layout.placement_table,
            "source_repo": self.layout.repo_marker(sender),
            "producers": list(self.producers(self.piece(handoff, site, piece)).values()),
        }

    def handoff_inputs(self, handoff: str, site: str, piece: str) -> dict[str, Path | list[Path]]:
        """Return what receiving a hand-off's piece waits for: its destination repository, what sending needs.

        One that another site's instance sends is awaited through the transfer backend,
        once this instance's own work before it is done: its stages before the hand-off
        and every piece of an earlier hand-off it sends to another instance. A waiting
        rule holds a job slot, so it must not start while the sender still needs
        something of this instance (a fan-out awaited while the fan-in it comes from is
        still to be sent would deadlock an instance whose slots all wait).
        """
        flow = self.handoffs[handoff]
        _, receiver = flow.ends(self.campaign, site)
        inputs: dict[str, Path | list[Path]] = {"destination_repo": self.layout.repo_marker(receiver)}
        if self.sends(handoff, site):
            return inputs | self.sending_inputs(handoff, site, piece)
        if flow.to_central:
            before = list(flow.producers)
        else:
            before, _ = stage_dependencies(self.campaign, self.campaign.stage(flow.consumers[0]))
        own = [self.stage_marker(receiver, stage) for stage in before if receiver in self.processing]
        order = list(self.handoffs)
        earlier = set(order[: order.index(handoff)])
        # One marker per earlier hand-off and far-end site: listing every piece made USDF's
        # instance preview at DR1 take 93 s (950 fan-in receives x 473 raws pieces).
        sent = [
            self.layout.handoff_sent_marker(name, far_end)
            for name, far_end in self.sent_handoffs
            if name in earlier
        ]
        return inputs | {"own_work": own + sent}

    def plan_inputs(self) -> dict[str, Path]:
        """Return what the plan needs: the central repository, or at another site's instance its raws."""
        if self.campaign.runs_here(self.campaign.central.name):
            return {"survey": self.survey_marker()}
        # The site's share of the placement comes with its first raws piece.
        first = self.pieces[("raws", self.campaign.instance)][0]
        return {"raws": self.layout.piece_marker(first)}

    def chunk_inputs(self, site: str, stage_name: str, chunk: str) -> dict[str, Path | list[Path]]:
        """Return what a chunk waits for: its site's verified inputs, earlier stages, incoming hand-offs."""
        stage = self.campaign.stage(stage_name)
        earlier, incoming = stage_dependencies(self.campaign, stage)
        inputs: dict[str, Path | list[Path]] = {
            "placement": self.layout.placement_table,
            "submit_yaml": self.layout.submit_yaml(site, stage_name, chunk),
            "earlier": [self.stage_marker(site, name) for name in earlier],
        }
        sites = self.processing if stage.is_central else [site]
        awaited = [p for h in incoming for s in sites for p in self.awaited_pieces(h, s, stage_name, chunk)]
        # Raws are awaited through their verification.
        inputs["handoffs"] = [self.layout.piece_marker(p) for p in awaited if p.handoff.name != "raws"]
        if not stage.is_central:
            inputs["verified_inputs"] = [
                self.layout.inputs_marker(site, p.name) for p in awaited if p.handoff.name == "raws"
            ]
        return inputs

    def qa_inputs(self) -> dict[str, Path | list[Path]]:
        """Return what the QA waits for: the reference, every final hand-off and the central stages."""
        central = self.campaign.central.name
        return {
            "reference": self.layout.reference_marker,
            "final": [path for site in self.processing for path in self.handoff_markers("final", site)],
            "central": [
                self.layout.stage_marker(central, stage.name)
                for stage in self.campaign.stages
                if stage.is_central
            ],
        }

    # ------------------------------------------------------------------ the instance's share
    def submit_yamls(self) -> list[Path]:
        """Return the BPS submit YAML of every chunk this instance runs."""
        return [
            self.layout.submit_yaml(site.name, stage.name, chunk)
            for stage in self.campaign.stages
            for site in self.campaign.stage_sites(stage)
            if self.campaign.runs_here(site.name)
            for chunk in self.chunks(site.name, stage.name)
        ]

    def sent_markers(self, handoff: str, site: str) -> list[Path]:
        """Return the sent markers of a hand-off's pieces for ``site`` that this instance still sends."""
        return self.sent_handoffs.get((handoff, site), [])

    @cached_property
    def sent_pieces(self) -> list[HandoffPiece]:
        """Hand-off pieces this instance sends to another site's instance and that have not arrived.

        One already received in this work directory (an instance running every site
        delivered it) has nothing left to send, so a site's preview lists only what
        is left for it. Read once per workflow: the markers it looks at are this
        instance's own.
        """
        return [
            piece
            for pieces in self.pieces.values()
            for piece in pieces
            for sender, receiver in [piece.handoff.ends(self.campaign, piece.site)]
            if self.campaign.runs_here(sender) and not self.campaign.runs_here(receiver)
            if not self.layout.piece_marker(piece).exists()
        ]

    @cached_property
    def sent_handoffs(self) -> dict[tuple[str, str], list[Path]]:
        """(hand-off, processing site) of the `sent_pieces`, in campaign order, to their sent markers."""
        markers: dict[tuple[str, str], list[Path]] = {}
        for piece in self.sent_pieces:
            markers.setdefault((piece.handoff.name, piece.site), []).append(
                self.layout.piece_marker(piece, sent=True)
            )
        return markers

    def stage_markers(self) -> list[Path]:
        """Return the marker of every stage this instance runs, at each of its sites.

        Hand-offs wait for chunks, so nothing else asks for the last site stages to be
        gathered into their stage collections.
        """
        return [
            self.stage_marker(site.name, stage.name)
            for stage in self.campaign.stages
            for site in self.campaign.stage_sites(stage)
            if self.campaign.runs_here(site.name)
        ]

    def campaign_targets(self) -> list[Path]:
        """Return the instance's share of the campaign.

        The QA at the central site (which needs the whole campaign), the hand-offs it
        sends to other instances, its stages and its BPS YAMLs.
        """
        qa = [self.layout.qa_marker] if self.campaign.runs_here(self.campaign.central.name) else []
        sent = [self.layout.handoff_sent_marker(handoff, site) for handoff, site in self.sent_handoffs]
        return [*qa, *sent, *self.stage_markers(), *self.submit_yamls()]
