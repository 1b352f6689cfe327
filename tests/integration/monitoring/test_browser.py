"""The dashboard in real headless Chromium (Debian `chromium`, driven by playwright; never `playwright install`).

Screenshots go to the `artifacts` folder (test-artifacts/monitoring-*.png).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common import events as ev
from services.common.bus import EventBus
from services.deliberation.domain import Task
from services.monitoring.main import RunningMonitoring

from .conftest import port_of

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 10_000

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: `apt-get install -y chromium` (see ENVIRONMENT.md)"
    ),
]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser, monitoring: RunningMonitoring):
    context = await browser.new_context(viewport={"width": 1440, "height": 960})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.base_url = monitoring.url  # type: ignore[attr-defined]
    yield page
    await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


async def open_tab(page, tab: str) -> None:
    from playwright.async_api import expect

    if not page.url.startswith(page.base_url):
        await page.goto(f"{page.base_url}/#{tab}")
        await expect(page.locator("#pill-feed")).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
    else:
        await page.click(f"nav.tabs a[data-tab='{tab}']")
    await expect(page.locator(f"#tab-{tab}")).to_be_visible()


async def publish_tokens(bus: EventBus, deliberation: str, agents: tuple[str, ...]) -> None:
    """Token chunks as the ray-executor streams them (start, tokens, end) for agents of a deliberation."""
    for agent in agents:
        for seq, (kind, text) in enumerate(
            [
                ("start", ""),
                ("tokens", "def allow(client_id):"),
                ("tokens", "\n    return bucket.take(client_id)"),
                ("end", ""),
            ]
        ):
            chunk = ev.TokenChunk(
                deliberation_id=deliberation, agent_id=agent, phase="GENERATE", kind=kind, seq=seq, text=text
            )
            await bus.publish(ev.make_event(chunk, ev.RAY_EXECUTOR))


async def test_approve_a_plan_and_watch_it_live(
    page, bus: EventBus, monitoring: RunningMonitoring, orchestrator_on, artifacts: Path
):
    from playwright.async_api import expect

    await orchestrator_on(port_of(monitoring.monitoring.settings.orchestrator_address))
    await open_tab(page, "approve")
    await page.fill("#f-story", "S-42")
    await page.fill("#f-plan", "P-1")
    await page.fill("#f-by", "po@example.com")
    await page.fill("#f-title", "Rate limiting for the public API")
    await page.check("#f-roles input[value=DEV]")
    await page.check("#f-roles input[value=QA]")
    await page.click("#add-task")
    await page.fill("#f-tasks .task-row >> nth=0 >> [name=task_id]", "T-1")
    await page.fill("#f-tasks .task-row >> nth=0 >> [name=description]", "Add a token-bucket rate limiter")
    await page.click("#approve-submit")

    await expect(page.locator("#approve-result")).to_contain_text("Published planning.plan.approved", timeout=WAIT_MS)
    seen = page.locator('#progress-events li[data-event-type="planning.plan.approved"]')
    await expect(seen).to_contain_text(
        "plan P-1 of story S-42 approved by po@example.com (DEV, QA, 1 task(s))", timeout=WAIT_MS
    )

    # The real orchestrator deliberates on the approval (DEV on T-1, QA on the plan); both appear live.
    cards = page.locator("#progress-deliberations .card.delib")
    await expect(cards).to_have_count(2, timeout=WAIT_MS)
    for role in ("DEV", "QA"):
        card = cards.filter(has_text=f"{role} · ")
        await expect(card).to_contain_text("COMPLETED", timeout=30_000)
        await expect(card).to_contain_text(
            re.compile(rf"Winner agent-{role.lower()}-00\d \(score \d+\.\d\d, (ARCHITECT|FALLBACK)\)")
        )
    await expect(
        page.locator('#progress-events li[data-event-type="orchestration.deliberation.completed"]')
    ).to_have_count(2)
    await page.screenshot(path=str(artifacts / "monitoring-approve.png"), full_page=True)

    await open_tab(page, "timeline")
    row = page.locator('#timeline tr[data-event-type="planning.plan.approved"]')
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("S-42")
    await page.select_option("#filter-family", "orchestration")
    # task.dispatched, deliberation.started and deliberation.completed for each of the two roles
    await expect(page.locator("#timeline tr")).to_have_count(6)
    await page.select_option("#filter-family", "")
    await page.screenshot(path=str(artifacts / "monitoring-timeline.png"), full_page=True)

    await publish_tokens(bus, "delib-t1-dev", ("agent-dev-001", "agent-dev-002"))
    await expect(page.locator('#timeline tr[data-event-type="vllm.streaming.chunk"]')).to_have_count(
        0
    )  # hidden by default
    await open_tab(page, "tokens")
    box = page.locator('#tokens .card.token[data-key="delib-t1-dev/agent-dev-001"]')
    await expect(box).to_contain_text("def allow(client_id):")
    await expect(box).to_contain_text("return bucket.take(client_id)")
    await expect(box).to_contain_text("done")


async def test_validation_errors_appear_next_to_the_fields(page, bus: EventBus, artifacts: Path):
    from playwright.async_api import expect

    await open_tab(page, "approve")
    await page.fill("#f-story", "S 42")  # a space: not a valid id
    await page.fill("#f-plan", "P-1")
    await page.click("#add-task")
    await page.fill("#f-tasks .task-row >> nth=0 >> [name=task_id]", "T-1")
    await page.click("#approve-submit")

    await expect(page.locator('.field[data-field="approved_by"] .field-error')).to_have_text(
        "Field required", timeout=WAIT_MS
    )
    await expect(page.locator('.field[data-field="story_id"] .field-error')).to_contain_text(
        "not a valid id (1-128 characters: letters, digits, _ : -)"
    )
    await expect(page.locator('.field[data-field="tasks.0.description"] .field-error')).to_contain_text(
        "at least 1 character"
    )
    await expect(page.locator('.field[data-field="plan_id"] .field-error')).to_be_empty()
    await expect(page.locator("#approve-result")).to_have_text("Please fix the highlighted fields.")
    await page.screenshot(path=str(artifacts / "monitoring-validation.png"), full_page=True)
    assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 0

    # Fixed, it goes through and the errors go away.
    await page.fill("#f-story", "S-42")
    await page.fill("#f-by", "po@example.com")
    await page.fill("#f-tasks .task-row >> nth=0 >> [name=description]", "Add a rate limiter")
    await page.click("#approve-submit")
    await expect(page.locator("#approve-result")).to_contain_text("Published", timeout=WAIT_MS)
    await expect(page.locator('.field[data-field="approved_by"] .field-error')).to_be_empty()


async def test_dead_letters_are_shown_with_their_reason(page, bus: EventBus, artifacts: Path):
    from playwright.async_api import expect

    H = ev.DeadLetterHeaders
    original = ev.make_event(
        ev.DeliberationCompleted(
            deliberation_id="D-7",
            task_id="T-7",
            role=ev.Role.QA,
            story_id="S-7",
            winner_id="a",
            winner_proposal_id="p",
            winner_content="x",
            winner_score=7.0,
            selection_method="FALLBACK",
        ),
        ev.ORCHESTRATOR,
    )
    reason = "handler failed after 5 deliveries: DatabaseError('graph unavailable')"
    headers = {
        H.REASON: reason,
        H.STREAM: ev.Streams.ORCHESTRATOR_EVENTS,
        H.SUBJECT: original.subject,
        H.CONSUMER: "context-deliberation-completed",
        H.DELIVERIES: "5",
        H.EVENT_ID: original.event_id,
    }
    await open_tab(page, "timeline")
    await bus.js.publish(ev.dead_letter_subject(original.subject), original.to_json(), headers=headers)
    await expect(page.locator("#dl-count")).to_have_text("1", timeout=WAIT_MS)
    await open_tab(page, "dead-letters")
    row = page.locator("#dead-letters tr")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text(reason)
    await expect(row).to_contain_text(original.subject)
    await expect(row).to_contain_text("context-deliberation-completed")
    await page.screenshot(path=str(artifacts / "monitoring-dead-letters.png"), full_page=True)


async def test_banner_names_the_down_orchestrator_and_recovers(
    page, bus: EventBus, monitoring: RunningMonitoring, orchestrator_on, artifacts: Path
):
    from playwright.async_api import expect

    address = monitoring.monitoring.settings.orchestrator_address
    await open_tab(page, "councils")
    line = page.locator('#banner .banner-line[data-dependency="orchestrator"]')
    await expect(line).to_contain_text(f"orchestrator unavailable at {address}", timeout=WAIT_MS)
    await expect(page.locator("#orch-status")).to_contain_text(f"orchestrator unavailable at {address}")
    await expect(page.locator("#pill-orchestrator")).to_have_attribute("data-state", "down")
    await expect(page.locator('#banner .banner-line[data-dependency="nats"]')).to_have_count(0)

    orchestrator = await orchestrator_on(port_of(address))
    try:
        await expect(line).to_have_count(0, timeout=WAIT_MS)
        await expect(page.locator("#banner")).to_be_hidden()
        await page.click("#councils-refresh")
        await expect(page.locator("#councils .council")).to_have_count(5)
        await expect(page.locator("#councils")).to_contain_text("agent-dev-002")

        # A deliberation seen in the events, its full result from the orchestrator.
        task = Task.create("T-9", "Write a Python function that parses ISO dates.", "DEV", story_id="S-42")
        result = await orchestrator.app.deliberate(task)
        await open_tab(page, "deliberations")
        row = page.locator("#delib-list tr", has_text="T-9")
        await expect(row).to_contain_text("COMPLETED", timeout=WAIT_MS)
        await row.click()
        detail = page.locator("#delib-detail")
        await expect(detail).to_contain_text("Task T-9")
        assert result.selection is not None and result.winner is not None
        await expect(detail).to_contain_text(result.selection.rationale[:60])
        await expect(detail.locator(".proposal.winner")).to_contain_text(f"#{result.winner.rank} {result.winner_id}")
        await expect(detail).to_contain_text("policy.secrets", use_inner_text=False)
        criteria = ", ".join(sorted(c.name for c in task.constraints.rubric))
        await expect(detail.locator(".votes").first).to_contain_text(re.compile(criteria.replace(", ", r" \d+, ")))
        await page.screenshot(path=str(artifacts / "monitoring-deliberation.png"), full_page=True)
    finally:
        await orchestrator.stop(0)
    await expect(line).to_contain_text("orchestrator unavailable", timeout=WAIT_MS)
