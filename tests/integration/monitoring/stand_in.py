"""A stand-in for the orchestrator's gRPC API (the generated servicer over real gRPC), for the monitoring tests.

It answers ListCouncils, GetStatus and GetDeliberationResult with fixed, realistic data, so the dashboard's
gRPC path, its recovery when the orchestrator returns, and the deliberation page can be tested before the
real orchestrator service exists. Tests against the real one only need ORCHESTRATOR_ADDRESS pointed at it.
"""

from __future__ import annotations

import grpc

from fleet.deliberation.v1 import deliberation_pb2 as d
from fleet.orchestrator.v1 import orchestrator_pb2 as o
from fleet.orchestrator.v1 import orchestrator_pb2_grpc

WINNER = """Use a token bucket per client, kept in Valkey so every replica shares it:

```python
def allow(client_id: str, now: float) -> bool:
    tokens, last = bucket.get(client_id, (CAPACITY, now))
    tokens = min(CAPACITY, tokens + (now - last) * RATE)
    if tokens < 1:
        return False
    bucket[client_id] = (tokens - 1, now)
    return True
```
"""


def council(role: str, n: int = 3) -> o.Council:
    agents = [
        d.Agent(agent_id=f"agent-{role.lower()}-{i:03d}", role=role, persona=p, temperature=t, seed=i)
        for i, (p, t) in enumerate([("pragmatic", 0.3), ("rigorous", 0.5), ("creative", 0.8)][:n], start=1)
    ]
    return o.Council(council_id=f"council-{role.lower()}", role=role, num_agents=n, agents=agents)


def result(task_id: str, story_id: str = "S-42") -> o.GetDeliberationResultResponse:
    votes = [
        d.Vote(
            voter_id="agent-dev-002",
            proposal_id="prop-1",
            position=0,
            scores={"correctness": 9, "clarity": 8},
            reason="handles refill",
        ),
        d.Vote(
            voter_id="agent-dev-003",
            proposal_id="prop-1",
            position=1,
            scores={"correctness": 8, "clarity": 8},
            reason="simple",
        ),
    ]
    checks = [
        d.CheckResult(name="python.syntax", passed=True, applicable=True),
        d.CheckResult(name="python.ruff", passed=True, applicable=True),
        d.CheckResult(name="policy.secrets", passed=True, applicable=True),
        d.CheckResult(name="yaml.parse", passed=False, applicable=False, detail="no YAML"),
    ]
    failing = [
        d.CheckResult(
            name="python.ruff",
            passed=False,
            applicable=True,
            findings=[d.Finding(message="F821 undefined name 'redis'", severity="error", line=3, block=1)],
        )
    ]
    first = d.Proposal(
        proposal_id="prop-1",
        author_id="agent-dev-001",
        author_role="DEV",
        content=WINNER,
        revisions=[
            d.Revision(number=0, content="A fixed window counter per client.", reason=""),
            d.Revision(number=1, content=WINNER, reason="peer: fixed windows burst at the edges"),
        ],
    )
    second = d.Proposal(
        proposal_id="prop-2", author_id="agent-dev-002", author_role="DEV", content="Use redis.incr per minute."
    )
    return o.GetDeliberationResultResponse(
        task_id=task_id,
        status=d.DELIBERATION_STATUS_COMPLETED,
        results=[
            d.RankedProposal(
                rank=1, score=8.6, proposal=first, checks=checks, votes=votes, peer_score=8.25, check_score=10
            ),
            d.RankedProposal(rank=2, score=5.1, proposal=second, checks=failing, peer_score=6.0, check_score=3.3),
        ],
        winner_id="agent-dev-001",
        duration_ms=41250,
        deliberation_id=f"delib-{task_id}",
        role="DEV",
        council_id="council-dev",
        selection=d.Selection(
            winner_id="agent-dev-001",
            method=d.SELECTION_METHOD_ARCHITECT,
            rationale="The token bucket bounds bursts and shares state across replicas; the other one does not parse.",
            selected_by="agent-architect-001",
        ),
        critiques=[
            d.Critique(
                round=1,
                proposal_id="prop-1",
                critic_id="agent-dev-002",
                author_id="agent-dev-001",
                verdict="revise",
                summary="fixed windows burst",
                issues=["2x burst at window edges"],
            ),
        ],
        usage=[d.TokenUsage(agent_id="agent-dev-001", phase="GENERATE", prompt_tokens=812, completion_tokens=230)],
        phase_durations=[
            d.PhaseDuration(phase="GENERATE", duration_ms=15000),
            d.PhaseDuration(phase="SCORE", duration_ms=9000),
        ],
        context_version="v7",
        total_tokens=5230,
        executor="in-process",
        story_id=story_id,
    )


class StandInOrchestrator(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    async def ListCouncils(self, request, context):
        roles = [request.role_filter] if request.role_filter else ["DEV", "QA", "ARCHITECT"]
        return o.ListCouncilsResponse(councils=[council(r) for r in roles])

    async def GetStatus(self, request, context):
        stats = o.Stats(
            total_deliberations=3,
            deliberations_by_status={"COMPLETED": 2, "FAILED": 1},
            average_duration_ms=38000,
            active_councils=3,
            in_flight=0,
            executor="in-process",
        )
        return o.GetStatusResponse(status="SERVING", uptime_seconds=120, stats=stats)

    async def GetDeliberationResult(self, request, context):
        if request.task_id.startswith("missing"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no deliberation for task {request.task_id}")
        return result(request.task_id)


async def start_stand_in(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(StandInOrchestrator(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server
