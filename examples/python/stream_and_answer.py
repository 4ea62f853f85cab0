#!/usr/bin/env python3
"""A chat client for opencode-nats-bridge, with nats-py.

Sends one prompt, streams the answer to the terminal as it arrives, shows
tool activity and provider retries on stderr, and answers the agent's
permission requests (and questions) itself.

    pip install nats-py
    python3 examples/python/stream_and_answer.py 'Run ls and tell me what you see'

The bridge asks the caller only for permissions its policy marks `ask`
(`[permissions] rules` in the daemon's config, e.g.
`{ permission = "bash", pattern = "*", action = "ask" }`) and only for
prompts that say `"interactive": true`, as this one does. docs/PROTOCOL.md
has the whole contract.

Exit status: 0 `final`, 2 `error`, 3 no reply in time, 1 NATS unreachable
or no bridge listening on the subject.
"""

import argparse
import asyncio
import json
import sys
import uuid

import nats
from nats.errors import TimeoutError as NatsTimeout


def say(*parts):
    """Side output (everything but the answer) goes to stderr."""
    print(*parts, file=sys.stderr, flush=True)


def decide(permission, policy):
    """`once`, `always` or `reject` for one permission request."""
    if policy != "ask":
        return policy
    if not sys.stdin.isatty():
        return "reject"
    what = " ".join(permission.get("patterns") or []) or permission.get("description", "")
    answer = input(f"allow {permission['permission']}: {what}? [once/always/reject] ").strip()
    return answer if answer in ("once", "always", "reject") else "reject"


async def run(args):
    try:
        nc = await nats.connect(args.server, connect_timeout=5, max_reconnect_attempts=0)
    except Exception as e:  # noqa: BLE001 - any failure to connect is the same to a user
        say(f"cannot connect to NATS at {args.server}: {e}")
        return 1
    try:
        # Replies stream to our own inbox, subscribed before the prompt goes out.
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.flush()
        subject = args.subject + (f".{args.conversation}" if args.conversation else "")
        prompt = {
            "text": args.text,
            "trace_id": str(uuid.uuid4()),
            "interactive": True,  # ask us about permissions and questions
            "progress": True,  # tell us when the model provider is being retried
        }
        if args.model:
            prompt["model"] = args.model
        await nc.publish(subject, json.dumps(prompt).encode(), reply=inbox)

        expected_seq = 0
        printed = ""  # the answer text printed so far (the deltas)
        while True:
            try:
                msg = await sub.next_msg(timeout=args.timeout)
            except NatsTimeout:
                say(f"no reply within {args.timeout}s (is the bridge running?)")
                return 3
            if not msg.data and (msg.headers or {}).get("Status") == "503":
                # NATS's "no responders": nothing subscribes to the subject.
                say(f"no bridge is listening on {subject} (is the daemon running, on this NATS server?)")
                return 1
            reply = json.loads(msg.data)
            if reply.get("seq") != expected_seq:
                say(f"(replies {expected_seq}..{reply.get('seq')} were lost on the way)")
            expected_seq = reply.get("seq", expected_seq) + 1
            kind = reply.get("kind")
            if kind == "delta":
                printed += reply["content"]
                print(reply["content"], end="", flush=True)
            elif kind == "reasoning":
                say(f"(thinking) {reply['content']}")
            elif kind == "tool_call":
                say(f"-> {reply['tool']} {json.dumps(reply.get('args'))}")
            elif kind == "tool_result":
                ok = "ok" if reply.get("success") else "failed"
                say(f"<- {reply['tool']} {ok}: {reply.get('result', '').strip()[:200]}")
            elif kind == "status" and reply.get("event") == "provider_retry":
                say(f"(the model provider failed, retry {reply['attempt']}: {reply['reason']})")
            elif kind == "permission":
                answer = decide(reply, args.permissions)
                ack = await nc.request(
                    reply["reply_subject"], json.dumps({"reply": answer}).encode(), timeout=10
                )
                say(f"permission {reply['permission']} {reply.get('patterns')}: {answer} -> {ack.data.decode()}")
            elif kind == "question":
                # Pick the first option of each question.
                answers = [[q["options"][0]["label"]] if q.get("options") else [] for q in reply["questions"]]
                ack = await nc.request(
                    reply["reply_subject"], json.dumps({"answers": answers}).encode(), timeout=10
                )
                say(f"question answered {answers} -> {ack.data.decode()}")
            elif kind == "final":
                whole = reply["content"]
                obj = reply.get("content_object")
                if obj:
                    # Too long for one NATS message: the whole text is an
                    # object in a NATS object store bucket.
                    store = await nc.jetstream().object_store(obj["bucket"])
                    whole = (await store.get(obj["name"])).data.decode()
                if whole.startswith(printed):
                    print(whole[len(printed):], end="")  # what the deltas did not carry
                print(flush=True)
                say(f"[{reply.get('model')}, {reply.get('duration_ms')} ms]")
                return 0
            elif kind == "error":
                print(flush=True)
                retry = ", retryable" if reply.get("retryable") else ""
                say(f"error ({reply['code']}{retry}): {reply['error']}")
                return 2
            # Any other kind: an extension this client does not know; skip it.
    finally:
        await nc.drain()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", help="the prompt")
    p.add_argument("--server", default="nats://127.0.0.1:4222")
    p.add_argument("--subject", default="opencode.prompt", help="the bridge's prompt subject")
    p.add_argument("--conversation", help="conversation key: prompts with the same key share context")
    p.add_argument("--model", help="provider/model for this prompt")
    p.add_argument(
        "--permissions",
        choices=["ask", "once", "always", "reject"],
        default="ask",
        help="how to answer permission requests (ask: on the terminal; reject when not a terminal)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for each reply")
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
