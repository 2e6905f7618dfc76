"""`pagedserve generate`: stream one answer from a running server to stdout.

Exit codes: 0 when the answer ended normally (stop or length), 1 when it was cut short
(finish_reason abort or error: a drain, an abort, a failure; said on stderr) or the
request failed, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import msgspec

from launcher.client_io import check_address_or_exit, quiet_broken_pipe
from shared.client import Client, RequestError
from shared.protocol import SamplingParams
from shared.structured import StructuredOutputs

CUT_SHORT = ("abort", "error")
SESSION_KEY_MAX_CHARS = 256  # SamplingParams.session_key's bound on the wire (shared/protocol.py)


def add_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt", help="the user message (sent through the chat template unless --raw)")
    gen.add_argument("--server", default="tcp://127.0.0.1:8765", metavar="tcp://HOST:PORT",
                     help="the frontend's client endpoint (default: tcp://127.0.0.1:8765)")
    gen.add_argument("--max-tokens", type=int, default=256, metavar="TOKENS",
                     help="most tokens to generate (default: 256)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="0 samples greedily (default: 0.0)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest; 0: all "
                                                                         "(default: 0)")
    gen.add_argument("--seed", type=int, default=None, metavar="N", help="reproducible sampling (default: none)")
    gen.add_argument("--ignore-eos", action="store_true", help="generate max_tokens even past the end-of-sequence "
                                                                 "token (benchmarks)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait this long for the server to become ready (default: 0)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, finish_reason, token counts) instead of streaming text")
    gen.add_argument("--session-key", default="", metavar="KEY",
                     help="routing affinity across engine replicas: requests with one KEY go to the replica "
                          f"that served the last of them while its load allows (at most {SESSION_KEY_MAX_CHARS} "
                          "characters)")
    beams = gen.add_argument_group("beam search (prints the best hypotheses at the end, best first)")
    beams.add_argument("--beam-width", type=int, default=0, metavar="W",
                       help="beam search with W beams (best_of); 0: off (default: 0)")
    beams.add_argument("-n", "--num-outputs", type=int, default=1, metavar="N",
                       help="with --beam-width: hypotheses to print, at most W (default: 1)")
    beams.add_argument("--length-penalty", type=float, default=1.0, metavar="P",
                       help="a hypothesis scores sum(logprobs) / length ** P (default: 1.0)")
    beams.add_argument("--early-stopping", choices=("true", "false", "never"), default="false",
                       help="transformers' meanings: true stops once W hypotheses are done (default: false)")
    shape = gen.add_argument_group("structured output (at most one)")
    shape.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid against this JSON Schema file")
    shape.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    shape.add_argument("--regex", metavar="REGEX", help="the answer matches this regular expression")
    shape.add_argument("--choice", metavar="TEXT", action="append", help="the answer is one of these (repeat it)")
    shape.add_argument("--grammar", metavar="FILE", help="the answer follows this Lark or GBNF grammar file")


def _structured(args) -> StructuredOutputs | None:
    """The constraint the flags ask for (None: none); OSError for a file that cannot be read."""
    given = {name: value for name, value in (("json", args.json_schema), ("regex", args.regex),
                                             ("choice", args.choice), ("grammar", args.grammar)) if value}
    if args.json_object:
        given["json_object"] = True
    for name in ("json", "grammar"):
        if name in given:
            with open(given[name], encoding="utf-8") as f:
                given[name] = f.read()
    return StructuredOutputs(**given) if given else None


def sampling_params(args) -> SamplingParams:
    """The request's SamplingParams from the flags; ValueError (or OSError for a file) names a bad one."""
    if len(args.session_key) > SESSION_KEY_MAX_CHARS:
        raise ValueError(f"--session-key is longer than {SESSION_KEY_MAX_CHARS} characters")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
                            structured_outputs=_structured(args), session_key=args.session_key)
    if args.beam_width:
        early = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
        params = msgspec.structs.replace(params, use_beam_search=True, best_of=args.beam_width,
                                         n=args.num_outputs, length_penalty=args.length_penalty,
                                         early_stopping=early, temperature=0.0)
    params.validate()
    return params


def _wait_ready(client: Client, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.health(timeout=2.0)["status"] == "ok":
                return
        except RequestError:
            pass
        if time.monotonic() >= deadline:
            raise RequestError("unavailable", f"server {client.address} not ready after {seconds} s")
        time.sleep(0.5)


def run_generate(args) -> int:
    check_address_or_exit("generate", args.server)
    try:
        params = sampling_params(args)
    except (ValueError, OSError) as e:
        print(f"pagedserve generate: {e}", file=sys.stderr)
        return 2
    with Client(args.server) as client:
        try:
            if args.wait > 0:
                _wait_ready(client, args.wait)
            if args.beam_width:
                return _print_beams(client, args, params)
            stream = (client.stream(args.prompt, params) if args.raw
                      else client.stream_chat([{"role": "user", "content": args.prompt}], params))
            for delta in stream:
                if not args.json:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
            completion = stream.completion
            reason = completion.outputs[0].finish_reason
            if args.json:
                print(json.dumps({"request_id": completion.request_id, "text": completion.outputs[0].text,
                                  "finish_reason": reason, "prompt_tokens": completion.prompt_tokens,
                                  "completion_tokens": completion.completion_tokens}))
            else:
                sys.stdout.write("\n")
                sys.stdout.flush()
        except RequestError as e:
            print(f"pagedserve generate: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            return quiet_broken_pipe()
    if reason in CUT_SHORT:
        print(f"pagedserve generate: the answer was cut short (finish_reason {reason})", file=sys.stderr)
        return 1
    return 0


def _print_beams(client: Client, args, params: SamplingParams) -> int:
    """Beam search answers come whole at the end: print each hypothesis with its score."""
    completion = (client.generate(args.prompt, params) if args.raw
                  else client.chat([{"role": "user", "content": args.prompt}], params))
    outputs = completion.outputs
    if args.json:
        print(json.dumps({"request_id": completion.request_id, "prompt_tokens": completion.prompt_tokens,
                          "completion_tokens": completion.completion_tokens,
                          "outputs": [{"text": o.text, "finish_reason": o.finish_reason, "beam_score": o.beam_score,
                                       "cumulative_logprob": o.cumulative_logprob} for o in outputs]}))
    else:
        for o in outputs:
            print(f"[{o.index}] score {o.beam_score:.4f} (sum of logprobs {o.cumulative_logprob:.4f}, "
                  f"{o.finish_reason}): {o.text}")
    reason = outputs[0].finish_reason
    if reason in CUT_SHORT:
        print(f"pagedserve generate: the answer was cut short (finish_reason {reason})", file=sys.stderr)
        return 1
    return 0
