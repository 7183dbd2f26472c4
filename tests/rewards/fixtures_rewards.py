"""Reward functions for the pool tests (loaded by path, as users' are)."""

import os
import time


def good(prompt, response, answer, **row):
    return {"score": 1.0 if response == answer else 0.0, "length": float(len(response))}


def raises(prompt, response, answer, **row):
    if response == "bad":
        raise ValueError("broken reward for 'bad'")
    return 1.0


def hangs(prompt, response, answer, **row):
    if response == "hang":
        time.sleep(3600)
    return 1.0


def slow(prompt, response, answer, **row):
    time.sleep(0.3)
    return 0.5


def dies(prompt, response, answer, **row):
    if response == "die":
        os._exit(3)
    return 1.0


def not_a_score(prompt, response, answer, **row):
    return "high"
