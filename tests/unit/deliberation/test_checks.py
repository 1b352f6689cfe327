"""The checks on real snippets: Python (ast + ruff), YAML, Kubernetes (strict schemas), JSON, and the policies."""

from __future__ import annotations

import pytest

from services.deliberation.checks import extract_blocks, guess_language, image_tag_problem, run_checks
from services.deliberation.domain import CheckResult

NAMES = [
    "python.syntax",
    "python.lint",
    "yaml.syntax",
    "kubernetes.schema",
    "json.syntax",
    "policy.secrets",
    "policy.privileged",
    "policy.image_tags",
    "policy.requirements",
]

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: {image}
          ports:
            - containerPort: 8080
          securityContext:
            runAsNonRoot: true
            allowPrivilegeEscalation: false{extra}
"""


def fenced(language: str, code: str) -> str:
    return f"Here is my proposal.\n\n```{language}\n{code}```\n\nDone.\n"


def checks(content: str, requirements=()) -> dict[str, CheckResult]:
    results = run_checks(content, requirements)
    assert [r.name for r in results] == NAMES
    return {r.name: r for r in results}


def deployment(image: str = "ghcr.io/acme/web:1.4.2", extra: str = "") -> str:
    return DEPLOYMENT.replace("{image}", image).replace("{extra}", extra)


def test_a_proposal_without_code_is_not_failed_for_it():
    result = checks("Use a queue and retry with backoff. Add tests for the retry path.", ["tests"])
    for name in ("python.syntax", "python.lint", "yaml.syntax", "kubernetes.schema", "json.syntax"):
        assert not result[name].applicable and result[name].passed
    assert result["python.syntax"].detail.startswith("no python code")
    assert result["json.syntax"].detail.startswith("no json")
    assert result["policy.secrets"].applicable and result["policy.secrets"].passed
    assert result["policy.requirements"].passed
    assert all(r.detail for r in result.values())  # every check says what it checked


def test_valid_python_passes():
    code = "def add(a: int, b: int) -> int:\n    return a + b\n\n\nassert add(1, 2) == 3\n"
    result = checks(fenced("python", code))
    assert result["python.syntax"].passed and result["python.syntax"].applicable
    assert result["python.lint"].passed and not result["python.lint"].findings
    assert "1 python block" in result["python.syntax"].detail and "ruff" in result["python.lint"].detail


def test_a_python_syntax_error_is_a_finding_with_its_line():
    result = checks(fenced("py", "def ok():\n    return 1\n\ndef broken(:\n    pass\n"))
    syntax = result["python.syntax"]
    assert not syntax.passed and len(syntax.findings) == 1
    assert syntax.findings[0].line == 4 and syntax.findings[0].block == 1
    assert "syntax error" in syntax.findings[0].message
    assert not result["python.lint"].applicable  # ruff would only repeat the syntax error


def test_ruff_finds_an_undefined_name_and_warns_on_an_unused_import():
    code = "import os\n\n\ndef total(items):\n    return sum(items) + offset\n"
    lint = checks(fenced("python", code))["python.lint"]
    assert not lint.passed
    by_code = {f.message.split(":")[0]: f for f in lint.findings}
    assert by_code["F821"].severity == "error" and by_code["F821"].line == 5 and "offset" in by_code["F821"].message
    assert by_code["F401"].severity == "warning" and by_code["F401"].line == 1


def test_an_unused_import_alone_is_only_a_warning():
    lint = checks(fenced("python", "import os\n\nVALUE = 1\n"))["python.lint"]
    assert lint.passed and [f.severity for f in lint.findings] == ["warning"]


def test_a_valid_kubernetes_deployment_passes_strict_validation():
    result = checks(fenced("yaml", deployment()))
    assert result["yaml.syntax"].passed
    k8s = result["kubernetes.schema"]
    assert k8s.applicable and k8s.passed and not k8s.findings and "1.33" in k8s.detail and "strict" in k8s.detail
    assert result["policy.image_tags"].passed and result["policy.privileged"].passed


def test_an_unknown_field_fails_strict_kubernetes_validation():
    k8s = checks(fenced("yaml", deployment(extra="\n          replicaz: 3")))["kubernetes.schema"]
    assert not k8s.passed
    (finding,) = k8s.findings
    assert "Deployment/web" in finding.message and "replicaz" in finding.message and finding.block == 1


def test_a_wrong_type_fails_kubernetes_validation():
    bad = deployment().replace("replicas: 2", "replicas: two")
    k8s = checks(fenced("yaml", bad))["kubernetes.schema"]
    assert not k8s.passed and "spec.replicas" in k8s.findings[0].message


def test_a_kind_without_a_schema_is_a_finding():
    widget = "apiVersion: acme.example.com/v1\nkind: Widget\nmetadata:\n  name: w\n"
    k8s = checks(fenced("yaml", widget))["kubernetes.schema"]
    assert not k8s.passed and "Couldn't find schema" in k8s.findings[0].message


def test_multi_document_yaml_and_invalid_yaml():
    service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n    - port: 80\n"
    result = checks(fenced("yaml", deployment() + "---\n" + service))
    assert result["kubernetes.schema"].passed and "2 objects" in result["kubernetes.schema"].detail
    broken = checks(fenced("yml", "a: [1, 2\nb: 3\n"))["yaml.syntax"]
    assert not broken.passed and broken.findings[0].line is not None


@pytest.mark.parametrize(
    ("image", "problem"),
    [("nginx:latest", "uses the :latest tag"), ("nginx", "has no tag"), ("localhost:5000/team/app", "has no tag")],
)
def test_unpinned_images_fail(image, problem):
    tags = checks(fenced("yaml", deployment(image=image)))["policy.image_tags"]
    assert not tags.passed and problem in tags.findings[0].message and image in tags.findings[0].message


def test_pinned_images_and_dockerfiles():
    assert image_tag_problem("localhost:5000/team/app:1.2") is None
    assert image_tag_problem("python@sha256:" + "a" * 64) is None
    dockerfile = "FROM python:3.12-slim AS build\nRUN pip wheel .\nFROM build\nFROM gcr.io/distroless/python3\n"
    tags = checks(fenced("dockerfile", dockerfile))["policy.image_tags"]
    assert not tags.passed and [f.message for f in tags.findings] == [
        "image gcr.io/distroless/python3 has no tag (means :latest)"
    ]
    assert tags.findings[0].line == 4


def test_privileged_containers_fail_but_advice_against_them_does_not():
    manifest = deployment(extra="\n            privileged: true")
    privileged = checks(fenced("yaml", manifest))["policy.privileged"]
    assert not privileged.passed and privileged.findings[0].block == 1
    assert checks(fenced("bash", "docker run --rm --privileged busybox:1.36 sh\n"))["policy.privileged"].findings
    advice = "Never set `privileged: true` on a container.\n\n" + fenced("yaml", deployment())
    assert checks(advice)["policy.privileged"].passed


@pytest.mark.parametrize(
    "leak",
    [
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        'DB_PASSWORD = "s3cr3t-hunter2"',
        "api_key: sk9f8a7s6d5f4g3h",
        "token = 'ghp_" + "a1B2c3D4" * 5 + "'",
        "postgres://admin:hunter2@db.internal:5432/app",
    ],
)
def test_secrets_are_found(leak):
    secrets = checks(fenced("python" if "=" in leak else "text", leak + "\n"))["policy.secrets"]
    assert not secrets.passed and secrets.findings and secrets.findings[0].line is not None


@pytest.mark.parametrize(
    "fine",
    [
        'password = os.environ["DB_PASSWORD"]',
        "password: ${DB_PASSWORD}",
        "token = get_token()",
        "max_tokens = 2048",
        "token: str | None = None",
        'password = ""',
        "api_key: <your-api-key>",
        "secretKeyRef:\n  name: db\n  key: password",
    ],
)
def test_placeholders_and_references_are_not_secrets(fine):
    assert checks(fenced("text", fine + "\n"))["policy.secrets"].passed


def test_a_json_error_is_a_finding_with_its_line():
    result = checks(fenced("json", '{\n  "name": "web",\n  "replicas": 2,\n}\n'))
    json_check = result["json.syntax"]
    assert not json_check.passed and json_check.findings[0].line == 4
    assert checks(fenced("json", '{"ok": true}\n'))["json.syntax"].passed


def test_kubernetes_objects_in_json_are_validated_too():
    manifest = '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}, "x": 1}\n'
    k8s = checks(fenced("json", manifest))["kubernetes.schema"]
    assert k8s.applicable and not k8s.passed and "'x' was unexpected" in k8s.findings[0].message


def test_requirements_are_looked_for_by_their_key_words():
    content = "We add structured logs with a correlation id and unit tests for the parser."
    result = checks(content, ["unit tests", "structured logging with correlation ids", "rate limiting per tenant"])
    req = result["policy.requirements"]
    assert not req.passed and len(req.findings) == 1
    assert "rate limiting per tenant" in req.findings[0].message
    assert not checks(content)["policy.requirements"].applicable


def test_blocks_are_extracted_with_their_language_and_position():
    content = (
        'Intro\n```python\nx = 1\n```\ntext\n~~~yaml\na: 1\n~~~\n```\n{"a": 1}\n```\n```\nimport os\n```\n```sh\nls\n'
    )
    blocks = extract_blocks(content)
    assert [(b.index, b.language, b.first_line, b.labelled) for b in blocks] == [
        (1, "python", 3, True),
        (2, "yaml", 7, True),
        (3, "json", 10, False),
        (4, "python", 13, False),
        (5, "sh", 16, True),  # unclosed: runs to the end
    ]
    assert blocks[0].code == "x = 1\n"
    assert guess_language("apiVersion: v1\nkind: Pod\n") == "yaml"
    assert guess_language("FROM python:3.12\n") == "dockerfile"
    assert guess_language("just words") == "text"


def test_a_crashing_check_is_reported_not_raised(monkeypatch):
    import services.deliberation.checks as checks_module

    def boom(blocks):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(checks_module, "check_json_syntax", boom)
    result = {r.name: r for r in run_checks("no code")}
    assert not result["json.syntax"].passed and "kaboom" in result["json.syntax"].findings[0].message
