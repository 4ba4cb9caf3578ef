"""The flow and upload state machines as tables (guard/core/engine.py): every (state, event) pair
either moves as the table says or raises IllegalTransition and changes nothing, and the engine
changes state only through the tables (no assignment around them)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from guard.core.engine import (
    FLOW_TABLE,
    UPLOAD_START_STATES,
    UPLOAD_TABLE,
    FlowEvent,
    FlowKey,
    FlowState,
    IllegalTransition,
    Upload,
    UploadEvent,
    UploadState,
)
from guard.core.packet import TCP
from guard.core.policy import UploadAction
from tests.enginekit import ECHO, Conn, engine

ENGINE = Path(__file__).resolve().parent.parent / "guard" / "core" / "engine.py"
KEY = FlowKey(TCP, "198.18.10.11", 40000, "198.18.20.1", 443)


def _flow(state: FlowState):
    eng = engine()
    Conn(eng).up(233, 1_000_000.0)
    flow = next(iter(eng.flows.values()))
    flow.state = state  # a test's setup, not the engine's: the engine never does this
    return flow


def _upload(state: UploadState) -> Upload:
    upload = Upload(id=7, device="echo", device_addr=ECHO, key=KEY, host=None,
                    category="voice", start=0.0, end=0.0, decided=0.0,
                    decided_after_packets=1, action=UploadAction.HOLD, turn=1)
    upload.state = state  # setup only, as above
    return upload


@pytest.mark.parametrize("state,event", list(itertools.product(FlowState, FlowEvent)),
                         ids=lambda v: v.value)
def test_every_flow_pair_moves_as_the_table_says_or_raises(state: FlowState,
                                                           event: FlowEvent) -> None:
    flow = _flow(state)
    expected = FLOW_TABLE.get((state, event))
    if expected is None:
        with pytest.raises(IllegalTransition, match=f"{event.value} is illegal when "
                                                    f"{state.value}"):
            flow.move(event)
        assert flow.state is state
    else:
        assert flow.move(event) is expected
        assert flow.state is expected


@pytest.mark.parametrize("state,event", list(itertools.product(UploadState, UploadEvent)),
                         ids=lambda v: v.value)
def test_every_upload_pair_moves_as_the_table_says_or_raises(state: UploadState,
                                                             event: UploadEvent) -> None:
    upload = _upload(state)
    expected = UPLOAD_TABLE.get((state, event))
    if expected is None:
        with pytest.raises(IllegalTransition, match=f"{event.value} is illegal when "
                                                    f"{state.value}"):
            upload.move(event)
        assert upload.state is state
    else:
        assert upload.move(event) is expected
        assert upload.state is expected


def test_final_states_have_no_way_out() -> None:
    assert not [pair for pair in FLOW_TABLE if pair[0] is FlowState.BLOCKED]
    assert not [pair for pair in UPLOAD_TABLE if pair[0] is UploadState.ENDED]


def test_every_state_is_reachable_and_every_event_used() -> None:
    reached = {FlowState.IDLE, FlowState.LOST} | set(FLOW_TABLE.values())
    assert reached == set(FlowState)
    assert {event for _, event in FLOW_TABLE} == set(FlowEvent)
    assert UPLOAD_START_STATES | set(UPLOAD_TABLE.values()) == set(UploadState)
    assert {event for _, event in UPLOAD_TABLE} == set(UploadEvent)


@pytest.mark.parametrize("state", [s for s in UploadState if s not in UPLOAD_START_STATES])
def test_an_upload_cannot_start_decided(state: UploadState) -> None:
    with pytest.raises(IllegalTransition, match="cannot start"):
        Upload(id=7, device="echo", device_addr=ECHO, key=KEY, host=None, category="voice",
               start=0.0, end=0.0, decided=0.0, decided_after_packets=1,
               action=UploadAction.HOLD, turn=1, state=state)


def test_the_engine_assigns_no_state_around_the_tables() -> None:
    """Only Flow.move and Upload.move write `.state` (a flow's and an upload's initial state
    is a constructor argument)."""
    tree = ast.parse(ENGINE.read_text())
    writers: list[str] = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        for node in ast.walk(func):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign)
                       else [])
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute) and sub.attr == "state":
                        writers.append(f"{func.name}:{node.lineno}")
    assert [w.split(":")[0] for w in writers] == ["move", "move"], writers


def test_the_architecture_doc_lists_the_flow_table() -> None:
    """docs/architecture.md's flow table says what FLOW_TABLE says."""
    doc = (ENGINE.parents[2] / "docs" / "architecture.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in FlowState.__members__:
            rows[FlowState[cells[0]]] = {e.strip() for e in cells[2].split(",") if e.strip()}
    assert set(rows) == set(FlowState)
    for state, events in rows.items():
        listed = {e.split(" (")[0] for e in events}
        assert listed == {event.value for (s, event) in FLOW_TABLE if s is state}, state
