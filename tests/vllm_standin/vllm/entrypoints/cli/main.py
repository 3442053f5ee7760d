"""A stand-in for `vllm serve` on machines where vLLM cannot be installed (no GPU): the
tests' `models.vllm.python` is an interpreter with this folder first on its path, so
`python -m vllm.entrypoints.cli.main serve MODEL ...` lands here.

It is a real server process: llama.cpp's OpenAI-compatible server (llama-cpp-python) serving a
GGUF file (`MODEL/*.gguf`, else $VLLM_STANDIN_GGUF) under `--served-model-name`, on `--host`
and `--port`, plus vLLM's documented control endpoints with vLLM's switches:
- GET /health
- POST /sleep?level=N, POST /wake_up, GET /is_sleeping: only with --enable-sleep-mode and
  VLLM_SERVER_DEV_MODE=1 (else 404, as vLLM); while asleep, generation answers 503
- POST /v1/load_lora_adapter {"lora_name", "lora_path"}: only with --enable-lora and
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; 400 for a folder without adapter_config.json or a
  name already loaded. The adapter is recorded, not applied (llama.cpp reads GGUF adapters):
  requests naming it are answered by the base model.
Every start and control call is appended as a JSON line to $VLLM_STANDIN_CALLS (if set), with
this process's pid, so tests can assert what flywheel asked for.
"""


import argparse
import json
import os
import sys
import time
from pathlib import Path


def record(event: str, **fields) -> None:
    path = os.environ.get("VLLM_STANDIN_CALLS")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"event": event, "pid": os.getpid(), "time": time.time(),
                                  **fields}) + "\n")


def main(argv):
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--served-model-name", default="")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--enable-sleep-mode", action="store_true")
    serve.add_argument("--enable-lora", action="store_true")
    serve.add_argument("--max-lora-rank", type=int, default=16)
    # the rest of what flywheel passes, in vLLM's spelling (anything else lands in "unknown")
    serve.add_argument("--tensor-parallel-size", type=int, default=1)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    args, rest = parser.parse_known_args(argv)

    found = sorted(Path(args.model).glob("*.gguf"))
    gguf = str(found[0]) if found else os.environ.get("VLLM_STANDIN_GGUF", "")
    name = args.served_model_name or args.model
    env = {k: os.environ.get(k) for k in ("VLLM_SERVER_DEV_MODE",
                                          "VLLM_ALLOW_RUNTIME_LORA_UPDATING")}
    record("start", model=args.model, name=name, argv=argv, env=env, unknown=rest)
    if os.environ.get("VLLM_STANDIN_FAIL"):
        print(os.environ["VLLM_STANDIN_FAIL"], file=sys.stderr, flush=True)
        return 1
    if not gguf:
        print(f"no GGUF in {args.model} and VLLM_STANDIN_GGUF unset", file=sys.stderr)
        return 1

    import uvicorn
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    app = create_app(server_settings=ServerSettings(host=args.host, port=args.port),
                     model_settings=[ModelSettings(model=gguf, model_alias=name, n_ctx=2048,
                                                   verbose=False)])
    state = {"sleeping": False, "adapters": {}}

    @app.middleware("http")
    async def asleep(request: Request, call_next):
        if state["sleeping"] and request.url.path.startswith("/v1/") and \
                request.method == "POST" and "lora" not in request.url.path:
            return JSONResponse({"error": "the engine is sleeping"}, status_code=503)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    if args.enable_sleep_mode and env["VLLM_SERVER_DEV_MODE"] == "1":
        @app.post("/sleep")
        async def sleep(level: int = 1):
            state["sleeping"] = True
            record("sleep", level=level)
            return PlainTextResponse("")

        @app.post("/wake_up")
        async def wake_up():
            state["sleeping"] = False
            record("wake_up")
            return PlainTextResponse("")

        @app.get("/is_sleeping")
        async def is_sleeping():
            return {"is_sleeping": state["sleeping"]}

    lora_updates = (env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] or "").lower() in ("true", "1")
    if args.enable_lora and lora_updates:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request):
            body = await request.json()
            lora_name, lora_path = body.get("lora_name"), body.get("lora_path")
            if lora_name in state["adapters"]:
                return JSONResponse({"error": f"The lora adapter '{lora_name}' has already "
                                              "been loaded."}, status_code=400)
            if not (Path(str(lora_path)) / "adapter_config.json").is_file():
                return JSONResponse({"error": f"no adapter_config.json in {lora_path}"},
                                    status_code=400)
            state["adapters"][lora_name] = lora_path
            record("load_lora_adapter", lora_name=lora_name, lora_path=lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{lora_name}' added successfully.")

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
