"""The dashboard in real headless Chromium (Debian `chromium`, driven by playwright; never `playwright install`).

Screenshots go to the `artifacts` folder (test-artifacts/monitoring-*.png).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common import events as ev
from services.common.bus import EventBus
from services.deliberation.domain import Task
from services.monitoring.main import RunningMonitoring, start

from .conftest import approval_payload, monitoring_settings, port_of

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
RATE_TESTS = "from solution import allow\n\n\ndef test_first_call_passes():\n    assert allow('c1')\n"

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, scope="module")
def chromium() -> None:
    """A missing browser fails these tests, saying how to install it (never a silent skip)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `apt-get install -y chromium` (scripts/install_system_packages.sh, run by make setup)"
        )


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        await browser.close()


@contextlib.asynccontextmanager
async def new_page(browser, url: str) -> AsyncIterator[object]:
    """A page of a new browser context (its own sessionStorage) on the dashboard at `url`; no JavaScript error."""
    context = await browser.new_context(viewport={"width": 1440, "height": 960})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.base_url = url  # type: ignore[attr-defined]
    yield page
    await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
async def page(browser, monitoring: RunningMonitoring):
    async with new_page(browser, monitoring.url) as page:
        yield page


@pytest.fixture
async def secured(nats_url: str, bus: EventBus, issuer) -> AsyncIterator[RunningMonitoring]:
    """The monitoring service accepting the bearer tokens of the local issuer (authentication on)."""
    running = await start(monitoring_settings(nats_url, auth_issuer=issuer.url), port=0)
    yield running
    await running.stop()


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
        # No tests in this plan and none written by the loopback LLM: nothing ran, so nothing is verified.
        await expect(card.locator('.verdict[data-verified="false"]')).to_contain_text("NOT VERIFIED")
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
    await page.fill("#f-story", "S 42")  # a space: not a valid id; no plan id
    await page.click("#add-task")
    await page.fill("#f-tasks .task-row >> nth=0 >> [name=task_id]", "T-1")
    await page.fill("#f-tasks .task-row >> nth=0 >> [name=tests]", "x = 1\n")
    await page.click("#approve-submit")

    await expect(page.locator('.field[data-field="plan_id"] .field-error')).to_have_text(
        "Field required", timeout=WAIT_MS
    )
    await expect(page.locator('.field[data-field="tasks.0.tests"] .field-error')).to_contain_text(
        "defines no test function"
    )
    await expect(page.locator('.field[data-field="story_id"] .field-error')).to_contain_text(
        "not a valid id (1-128 characters: letters, digits, _ : -)"
    )
    await expect(page.locator('.field[data-field="tasks.0.description"] .field-error')).to_contain_text(
        "at least 1 character"
    )
    # Without authentication the approver is optional ('anonymous' when left empty).
    await expect(page.locator('.field[data-field="approved_by"] .field-error')).to_be_empty()
    await expect(page.locator("#approve-result")).to_have_text("Please fix the highlighted fields.")
    await page.screenshot(path=str(artifacts / "monitoring-validation.png"), full_page=True)
    assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 0

    # Fixed, but a second task depends on itself: the plan's rule is shown at that task's depends_on.
    await page.fill("#f-story", "S-42")
    await page.fill("#f-plan", "P-1")
    await page.fill("#f-by", "po@example.com")
    await page.fill("#f-tasks .task-row >> nth=0 >> [name=description]", "Add a rate limiter")
    await page.fill("#f-tasks .task-row >> nth=0 >> [name=tests]", RATE_TESTS)
    await page.click("#add-task")
    await page.fill("#f-tasks .task-row >> nth=1 >> [name=task_id]", "T-2")
    await page.fill("#f-tasks .task-row >> nth=1 >> [name=description]", "Document the limits")
    await page.fill("#f-tasks .task-row >> nth=1 >> [name=depends_on]", "T-1, T-2")
    await page.click("#approve-submit")
    await expect(page.locator('.field[data-field="tasks.1.depends_on"] .field-error')).to_have_text(
        "task T-2 depends on itself", timeout=WAIT_MS
    )
    await expect(page.locator('.field[data-field="plan_id"] .field-error')).to_be_empty()
    await expect(page.locator('.field[data-field="tasks.0.tests"] .field-error')).to_be_empty()

    # Fixed, it goes through and the errors go away; the event carries the tests and the dependency.
    await page.fill("#f-tasks .task-row >> nth=1 >> [name=depends_on]", "T-1")
    await page.click("#approve-submit")
    await expect(page.locator("#approve-result")).to_contain_text("Published", timeout=WAIT_MS)
    await expect(page.locator('.field[data-field="tasks.1.depends_on"] .field-error')).to_be_empty()
    stored = await bus.js.get_msg(ev.Streams.PLANNING_EVENTS, 1)
    tasks = ev.parse_event(stored.data, stored.subject).payload.tasks
    assert tasks[0].tests == RATE_TESTS.strip() and tasks[1].depends_on == ["T-1"]


async def test_a_double_click_approves_once(page, bus: EventBus, artifacts: Path):
    """One approval per intent: the button is disabled while its request is in flight, and the form as filled in has
    one Idempotency-Key (the event id): the same form submitted again is published once (`duplicate`), a changed
    form is a new approval."""
    from playwright.async_api import expect

    sent: list[str] = []
    release = asyncio.Event()

    async def hold(route) -> None:  # the first request stays in flight until released: a user's slow network
        sent.append(route.request.headers.get("idempotency-key", ""))
        await release.wait()
        await route.continue_()

    await page.route("**/api/approve-plan", hold)
    await open_tab(page, "approve")
    await page.fill("#f-story", "S-42")
    await page.fill("#f-plan", "P-1")
    await page.fill("#f-by", "po@example.com")
    button, result = page.locator("#approve-submit"), page.locator("#approve-result")

    await button.dblclick()
    await expect(button).to_be_disabled()
    await expect(result).to_have_text("publishing…")
    release.set()
    await expect(result).to_contain_text("Published planning.plan.approved", timeout=WAIT_MS)
    await expect(button).to_be_enabled()
    assert len(sent) == 1 and re.fullmatch(r"[A-Za-z0-9_:.\-]{1,128}", sent[0]), sent
    assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 1
    stored = await bus.js.get_msg(ev.Streams.PLANNING_EVENTS, 1)
    assert ev.parse_event(stored.data, stored.subject).event_id == sent[0]
    seen = page.locator('#progress-events li[data-event-type="planning.plan.approved"]')
    await expect(seen).to_have_count(1, timeout=WAIT_MS)

    # The same form again (a second click after the answer, a retry): the same key, published once.
    await button.click()
    await expect(result).to_contain_text("already published", timeout=WAIT_MS)
    assert sent == [sent[0], sent[0]]
    assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 1
    await page.screenshot(path=str(artifacts / "monitoring-approve-once.png"), full_page=True)

    # Changed, it is another approval: a new key, a new event.
    await page.fill("#f-title", "Rate limiting, second version")
    await button.click()
    await expect(result).to_contain_text("Published", timeout=WAIT_MS)
    await expect(result).not_to_contain_text("already published")
    assert len(sent) == 3 and sent[2] != sent[0]
    assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 2


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


SLUGIFY_TESTS = """from solution import slugify


def test_lowercase():
    assert slugify("Hello") == "hello"


def test_spaces_become_dashes():
    assert slugify("a b  c") == "a-b-c"
"""
ACCENT_TESTS = """from solution import slugify


def test_accents_are_dropped():
    assert slugify("Ça va") == "ca-va"
"""
BUGGY = "```python\ndef slugify(text):\n    return text.lower()\n```\n"
FIXED = '```python\ndef slugify(text):\n    return "-".join(text.lower().split())\n```\n'


async def test_grounded_deliberations_show_verified_and_the_failing_tests(
    page, bus: EventBus, monitoring: RunningMonitoring, orchestrator_on, sandbox_address: str, llm_server, artifacts
):
    """The PO approves a plan whose tasks carry tests; the real orchestrator runs each proposal's code against them
    in the real sandbox. The page shows which deliberation is verified and why, the failing tests of a proposal's
    first revision and its revision that fixed them, and a deliberation nobody could verify."""
    from playwright.async_api import expect

    # agent-dev-001 first writes code that fails a test, then fixes it when its revision is shown the failure; the
    # others write the fixed code at once. Nobody drops accents: T-2's test fails for everyone.
    await llm_server.acontrol(
        answer_when_contains={"FAILED tests.task": FIXED, "You are agent-dev-001": BUGGY, "You are agent-dev-": FIXED}
    )
    try:
        await orchestrator_on(
            port_of(monitoring.monitoring.settings.orchestrator_address), sandbox_address=sandbox_address
        )
        await open_tab(page, "approve")
        await page.fill("#f-story", "S-77")
        await page.fill("#f-plan", "P-1")
        await page.fill("#f-by", "po@example.com")
        await page.check("#f-roles input[value=DEV]")
        for i, (task_id, description, tests) in enumerate(
            [("T-1", "Write slugify(text)", SLUGIFY_TESTS), ("T-2", "Make slugify drop accents", ACCENT_TESTS)]
        ):
            await page.click("#add-task")
            row = page.locator("#f-tasks .task-row").nth(i)
            await row.locator("[name=task_id]").fill(task_id)
            await row.locator("[name=description]").fill(description)
            await row.locator("[name=tests]").fill(tests)
        await page.locator("#f-tasks .task-row").nth(1).locator("[name=depends_on]").fill("T-1")
        await page.click("#approve-submit")
        await expect(page.locator("#approve-result")).to_contain_text("Published", timeout=WAIT_MS)

        cards = page.locator("#progress-deliberations .card.delib")
        t1, t2 = cards.filter(has_text="DEV · T-1"), cards.filter(has_text="DEV · T-2")
        await expect(t1.locator('.verdict[data-verified="true"]')).to_contain_text("VERIFIED", timeout=60_000)
        await expect(t2.locator('.verdict[data-verified="false"]')).to_contain_text("NOT VERIFIED", timeout=60_000)
        await page.screenshot(path=str(artifacts / "monitoring-grounded-approve.png"), full_page=True)

        # The list says it at a glance, with the reason.
        await open_tab(page, "deliberations")
        rows = page.locator("#delib-list tr")
        await expect(rows.filter(has_text="T-1").locator(".verdict")).to_have_attribute("data-verified", "true")
        await expect(rows.filter(has_text="T-1")).to_contain_text("tests.task")
        await expect(rows.filter(has_text="T-2").locator(".verdict")).to_contain_text("NOT VERIFIED")

        # T-1: verified; the winner's code; agent-dev-001's first revision failed a test, its revision passed.
        await rows.filter(has_text="T-1").click()
        detail = page.locator("#delib-detail")
        verdict = detail.locator(".verdict.big")
        await expect(verdict).to_have_attribute("data-verified", "true", timeout=WAIT_MS)
        await expect(verdict).to_contain_text(re.compile(r"^VERIFIED.*passed .*tests\.task"))
        await expect(detail.locator("pre.winner-code")).to_contain_text('return "-".join(text.lower().split())')
        first = detail.locator('.proposal[data-author="agent-dev-001"]')
        failed = first.locator('.revision[data-revision="0"] li.check[data-check="tests.task"]')
        await expect(failed).to_have_attribute("data-state", "fail")
        await expect(failed.locator(".findings")).to_be_visible()
        await expect(failed.locator(".findings")).to_contain_text("test_spaces_become_dashes")
        await expect(failed.locator(".findings")).to_contain_text("a-b-c")
        fixed = first.locator('.revision[data-revision="1"] li.check[data-check="tests.task"]')
        await expect(fixed).to_have_attribute("data-state", "pass")
        final = first.locator(':scope > ul.checks > li.check[data-check="tests.task"]')
        await expect(final).to_have_attribute("data-state", "pass")
        await expect(final.locator(".badge.gating")).to_have_text("gating")
        not_applicable = first.locator(':scope > ul.checks .check[data-check="kubernetes.schema"]')
        await expect(not_applicable).to_have_attribute("data-state", "na")
        await expect(not_applicable.locator(".badge.gating")).to_have_count(1)
        await page.screenshot(path=str(artifacts / "monitoring-grounded-verified.png"), full_page=True)

        # T-2: nobody passed; the reason says what failed, and every proposal shows its failing test.
        await rows.filter(has_text="T-2").click()
        await expect(verdict).to_have_attribute("data-verified", "false", timeout=WAIT_MS)
        await expect(verdict).to_contain_text(re.compile(r"^NOT VERIFIED.*tests\.task"))
        failing = detail.locator(':scope .proposal > ul.checks > li.check[data-check="tests.task"][data-state="fail"]')
        await expect(failing).to_have_count(3)
        await expect(failing.first.locator(".findings")).to_contain_text("test_accents_are_dropped")
        await page.screenshot(path=str(artifacts / "monitoring-grounded-not-verified.png"), full_page=True)
    finally:
        await llm_server.acontrol(reset=True, delay_ms=20)


SIGN_IN_HINT = "fleet token --role product-owner --user you@example.com"


async def fill_plan(page, story: str, plan: str) -> None:
    await page.fill("#f-story", story)
    await page.fill("#f-plan", plan)
    await page.check("#f-roles input[value=DEV]")


async def sign_in(page, token: str) -> None:
    await page.fill("#signin-token", token)
    await page.click("#signin-submit")


async def test_sign_in_with_a_token_and_approve_as_its_subject(
    browser, secured: RunningMonitoring, bus, issuer, artifacts
):
    """Authentication on: without a token the page asks for one and the approval is refused; signed in as a
    product owner (the token in this tab only, sent as a header, never in a URL) the approval is sent again and
    published once, its approver the token's subject, and the live feed shows it."""
    from playwright.async_api import expect

    async with new_page(browser, secured.url) as page:
        urls: list[str] = []
        page.on("request", lambda request: urls.append(request.url))
        await page.goto(f"{secured.url}/#approve")
        signin = page.locator("#signin")
        await expect(signin).to_be_visible(timeout=WAIT_MS)
        await expect(signin).to_contain_text(SIGN_IN_HINT)
        await expect(page.locator("#user")).to_be_hidden()

        await page.fill("#f-story", "S-42")
        await page.fill("#f-plan", "P-1")
        await page.click("#approve-submit")
        result = page.locator("#approve-result")
        await expect(result).to_have_attribute("data-status", "401", timeout=WAIT_MS)
        await expect(result).to_contain_text("sign in first")
        await expect(signin).to_be_visible()
        await page.screenshot(path=str(artifacts / "monitoring-sign-in.png"), full_page=True)
        assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 0

        token = issuer.mint("alice@example.com", roles=["viewer", "product-owner"])
        await sign_in(page, token)
        await expect(signin).to_be_hidden(timeout=WAIT_MS)
        await expect(page.locator("#user-name")).to_have_text("signed in as alice@example.com · product-owner, viewer")
        # The approval waiting for the sign-in goes out, as alice (the approver is the token's, not a field).
        await expect(result).to_contain_text("Published planning.plan.approved", timeout=WAIT_MS)
        await expect(page.locator("#f-by")).to_be_hidden()
        await expect(page.locator("#f-by-token")).to_have_text("approved by alice@example.com")
        await expect(page.locator("#pill-feed")).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
        seen = page.locator('#progress-events li[data-event-type="planning.plan.approved"]')
        await expect(seen).to_contain_text("plan P-1 of story S-42 approved by alice@example.com", timeout=WAIT_MS)
        await page.screenshot(path=str(artifacts / "monitoring-signed-in.png"), full_page=True)

        assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 1
        stored = await bus.js.get_msg(ev.Streams.PLANNING_EVENTS, 1)
        event = ev.parse_event(stored.data, stored.subject)
        assert event.actor == "alice@example.com" and event.payload.approved_by == "alice@example.com"

        # The token stays in this tab (sessionStorage) and never appears in a URL.
        assert await page.evaluate("sessionStorage.getItem('fleet.token')") == token
        assert await page.evaluate("localStorage.length") == 0
        assert urls and not [u for u in urls if token in u]


async def test_a_viewer_is_told_what_it_lacks_and_signs_out(
    browser, secured: RunningMonitoring, bus, issuer, artifacts
):
    """A refused token keeps the sign-in box with the reason; a token that may not read is told so; a viewer sees the
    dashboard, and its approval is refused with the role it lacks, next to the button; signing out forgets the token."""
    from playwright.async_api import expect

    async with new_page(browser, secured.url) as page:
        await page.goto(f"{secured.url}/#approve")
        signin = page.locator("#signin")
        await expect(signin).to_be_visible(timeout=WAIT_MS)
        expired = issuer.mint("bob@example.com", roles=["viewer"], ttl_seconds=-120)
        await sign_in(page, expired)
        await expect(page.locator("#signin-why")).to_contain_text(
            "Your token was refused: token expired", timeout=WAIT_MS
        )
        await expect(signin).to_be_visible()
        assert await page.evaluate("sessionStorage.getItem('fleet.token')") is None

        # A token without a role that may read: signed in, told what it lacks, and it can sign out.
        await sign_in(page, issuer.mint("nobody@example.com", roles=[]))
        await expect(page.locator("#user-name")).to_have_text("signed in as nobody@example.com · no roles")
        await expect(page.locator("#banner")).to_contain_text("nobody@example.com lacks role viewer", timeout=WAIT_MS)
        await page.click("#sign-out")
        await expect(signin).to_be_visible(timeout=WAIT_MS)

        await sign_in(page, issuer.mint("bob@example.com", roles=["viewer"]))
        await expect(signin).to_be_hidden(timeout=WAIT_MS)
        await expect(page.locator("#user-name")).to_have_text("signed in as bob@example.com · viewer")
        await expect(page.locator("#pill-feed")).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
        await fill_plan(page, "S-43", "P-1")
        await page.click("#approve-submit")
        result = page.locator("#approve-result")
        await expect(result).to_have_attribute("data-status", "403", timeout=WAIT_MS)
        await expect(result).to_contain_text("bob@example.com lacks role product-owner")
        await page.screenshot(path=str(artifacts / "monitoring-viewer-refused.png"), full_page=True)
        assert (await bus.js.stream_info(ev.Streams.PLANNING_EVENTS)).state.messages == 0

        await page.click("#sign-out")
        await expect(signin).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#user")).to_be_hidden()
        assert await page.evaluate("sessionStorage.getItem('fleet.token')") is None


async def test_the_live_feed_reconnects_after_the_service_restarts(browser, nats_url: str, bus: EventBus):
    """The feed (fetch, not EventSource) notices the service going away, says so, and reconnects when it is back;
    what the page had is not shown twice, what happened meanwhile arrives."""
    from playwright.async_api import expect

    settings = monitoring_settings(nats_url)
    running = await start(settings, port=0)
    port = running.port
    try:
        async with new_page(browser, running.url) as page:
            await open_tab(page, "timeline")
            await bus.publish(ev.make_event(approval_payload("S-1"), ev.MONITORING))
            rows = page.locator('#timeline tr[data-event-type="planning.plan.approved"]')
            await expect(rows).to_have_count(1, timeout=WAIT_MS)

            # Going away, the service drops its feed clients (as one that falls behind is dropped), then stops.
            hub = running.monitoring.feed.hub
            for client in list(hub.clients):
                hub._drop(client, "the service is stopping")
            await running.stop(timeout=2)
            pill = page.locator("#pill-feed")
            await expect(pill).to_have_attribute("data-state", "down", timeout=WAIT_MS)
            await expect(pill).to_have_attribute("title", re.compile(r"reconnecting in \d"))
            await bus.publish(ev.make_event(approval_payload("S-2"), ev.MONITORING))

            running = await start(settings, port=port)
            await expect(pill).to_have_attribute("data-state", "ok", timeout=20_000)
            await expect(rows).to_have_count(2, timeout=WAIT_MS)
            await expect(rows.filter(has_text="S-1")).to_have_count(1)
    finally:
        await running.stop(timeout=2)
