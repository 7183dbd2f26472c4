"""Remote reward service (a local HTTP server) and a HF reward model scored in the pool."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import transformers

from megarl.config import resolve_model_path
from megarl.rewards.pool import RewardError, RewardPool
from megarl.rewards.remote import RemoteReward

pytestmark = pytest.mark.cpu


class ScoringService:
    """Scores len(response) / 10; fails the first ``failures`` requests with HTTP 503, and sleeps
    ``delay_s`` per request."""

    def __init__(self, failures=0, delay_s=0.0):
        self.failures, self.delay_s, self.requests = failures, delay_s, []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return None

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                service.requests.append(payload)
                time.sleep(service.delay_s)
                if service.failures > 0:
                    service.failures -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                scores = [{"score": len(s["response"]) / 10, "words": 1.0} for s in payload["samples"]]
                body = json.dumps({"scores": scores}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def samples(n):
    return [{"prompt": "p", "response": "x" * i, "answer": "a"} for i in range(n)]


def test_remote_batches_and_retries():
    service = ScoringService(failures=2)
    try:
        batch = RemoteReward(service.url, batch_size=3, retries=3).score(samples(7))
    finally:
        service.close()
    assert batch.scores == pytest.approx([i / 10 for i in range(7)]) and batch.failures == 0
    assert batch.extras == {"words": 1.0} and batch.sample_extras == [{"words": 1.0}] * 7
    # 2 refused + 3 batches (3, 3, 1 samples).
    assert [len(r["samples"]) for r in service.requests] == [3, 3, 3, 3, 1]


def test_remote_timeout_scores_zero_and_counts():
    service = ScoringService(delay_s=1.0)
    try:
        reward = RemoteReward(service.url, batch_size=2, retries=0, timeout_s=0.2, max_failure_rate=1.0)
        batch = reward.score(samples(3))
    finally:
        service.close()
    assert batch.scores == [0.0, 0.0, 0.0] and batch.failures == 3 and batch.timeouts == 3
    assert service.url in batch.first_error


def test_remote_unreachable_stops_above_failure_rate():
    with pytest.raises(RewardError, match="3 of 3 samples failed"):
        RemoteReward("http://127.0.0.1:9/score", retries=1, timeout_s=0.5).score(samples(3))


def test_reward_model_in_the_pool(tmp_path):
    source = resolve_model_path("bundled:tiny-dense")
    config = transformers.AutoConfig.from_pretrained(source)
    config.num_labels = 1
    config.architectures = ["Qwen3ForSequenceClassification"]
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected = []
    with torch.no_grad():
        for response in ("3", "max 7"):
            inputs = tokenizer("first 3 1 2" + response, return_tensors="pt")
            expected.append(float(model(**inputs).logits[0, 0]))
    with RewardPool("model", str(tmp_path), num_workers=1, timeout_s=60) as rewards:
        batch = rewards.score([{"prompt": "first 3 1 2", "response": r, "answer": "3"} for r in ("3", "max 7")])
    assert batch.failures == 0
    assert batch.scores == pytest.approx(expected, abs=1e-5)
