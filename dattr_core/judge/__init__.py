"""The LLM judge (design §5): rubric prompts, robust score parsing, an on-disk cache, an async
OpenAI-compatible client with retries, and an offline reference judge for `ground_truth_0_2`."""

from .cache import JudgeCache, cache_key, default_cache_path
from .client import DEFAULT_MODEL, JudgeConfig
from .offline import JUDGE_NAME as OFFLINE_JUDGE
from .offline import ground_truth_check, offline_judge
from .output import write_judge_parquet
from .parse import parse_judgement
from .records import (JudgeAPIError, JudgeConfigError, JudgeError, JudgeInputError, JudgeItem, JudgeResult,
                      JudgeRun, Usage)
from .rubrics import MAX_SCORE, judge_messages
from .run import judge_replies, judge_replies_async
from .summary import summarize

__all__ = [
    "DEFAULT_MODEL", "MAX_SCORE", "OFFLINE_JUDGE", "JudgeAPIError", "JudgeCache", "JudgeConfig",
    "JudgeConfigError", "JudgeError", "JudgeInputError", "JudgeItem", "JudgeResult", "JudgeRun", "Usage",
    "cache_key", "default_cache_path", "ground_truth_check", "judge_messages", "judge_replies", "judge_replies_async",
    "offline_judge", "parse_judgement", "summarize", "write_judge_parquet",
]
