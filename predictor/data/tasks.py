"""Task names, categories and chance levels, as a data table.

`TASKS` maps a normalised task name to its category, the score a random guesser gets (percent;
None where it is not meaningful), the lm-evaluation-harness task ids that mean the same task, and
the spellings used by published sources.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    chance_pct: float | None
    lm_eval_ids: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


TASKS: dict[str, Task] = {t.name: t for t in [
    # knowledge
    Task("MMLU", "knowledge", 25.0, ("mmlu", "mmlu_flan_n_shot_generative"), ("MMLU (5-shot)",)),
    Task("MMLU-Pro", "knowledge", 10.0, ("mmlu_pro", "leaderboard_mmlu_pro"),
         ("MMLU-Pro (leaderboard)", "MMLU-Pro (leaderboard, 5-shot)")),
    Task("OpenBookQA", "knowledge", 25.0, ("openbookqa",)),
    Task("TruthfulQA-MC1", "knowledge", 22.0, ("truthfulqa_mc1",), ("TruthfulQA-mc1",)),
    Task("TruthfulQA-MC2", "knowledge", None, ("truthfulqa_mc2",)),
    Task("C-Eval", "knowledge", 25.0, ("ceval-valid", "ceval"), ("C-Eval-valid",)),
    Task("CMMLU", "knowledge", 25.0, ("cmmlu",)),
    Task("IQuiz", "knowledge", 25.0, (), ("IQuiz (Chinese)",)),
    Task("TriviaQA", "knowledge", 0.0, ("triviaqa",)),
    Task("NaturalQuestions", "knowledge", 0.0, ("nq_open",)),
    Task("OpenLLM-v1 avg", "knowledge", None),
    # reasoning: commonsense / multiple-choice reasoning
    Task("ARC-Challenge", "reasoning", 25.0, ("arc_challenge",)),
    Task("ARC-Easy", "reasoning", 25.0, ("arc_easy",)),
    Task("HellaSwag", "reasoning", 25.0, ("hellaswag",)),
    Task("PIQA", "reasoning", 50.0, ("piqa",)),
    Task("Winogrande", "reasoning", 50.0, ("winogrande",)),
    Task("BoolQ", "reasoning", 62.2, ("boolq",)),  # majority class ("yes") of the validation split
    Task("RTE", "reasoning", 50.0, ("rte",)),
    Task("CommonsenseQA", "reasoning", 20.0, ("commonsense_qa",)),
    Task("StrategyQA", "reasoning", 50.0),
    Task("GPQA", "reasoning", 25.0, ("gpqa_main_zeroshot", "gpqa_main_n_shot", "leaderboard_gpqa_main")),
    Task("GPQA-Diamond", "reasoning", 25.0, ("gpqa_diamond_zeroshot", "gpqa_diamond_n_shot", "leaderboard_gpqa_diamond")),
    Task("MuSR", "reasoning", None, ("leaderboard_musr",)),
    Task("BBH", "reasoning", None, ("bbh", "leaderboard_bbh")),
    Task("DROP", "reasoning", 0.0, ("drop",)),
    Task("lm-eval avg10", "reasoning", None, (),
         ("avg10 (lambada,hellaswag,piqa,winogrande,tqa_mc1,obqa,boolq,arc_e,arc_c,mmlu)",)),
    Task("avg6 commonsense", "reasoning", None),
    Task("MT-Bench reasoning", "reasoning", None, (), ("MT-Bench-style reasoning",)),
    # math
    Task("GSM8K", "math", 0.0, ("gsm8k", "gsm8k_cot"), ("GSM8K (strict)", "GSM8K 5-shot", "GSM8K 5-shot strict")),
    Task("MATH-500", "math", 0.0, (), ("MATH 500",)),
    Task("MATH", "math", 0.0, ("minerva_math", "hendrycks_math", "leaderboard_math_hard")),
    Task("AIME-2024", "math", 0.0, (), ("AIME 2024",)),
    Task("AIME-90", "math", 0.0),
    Task("MT-Bench math", "math", None, (), ("MT-Bench-style math",)),
    # code
    Task("HumanEval", "code", 0.0, ("humaneval",)),
    Task("MBPP", "code", 0.0, ("mbpp",)),
    Task("MBPP+", "code", 0.0, ("mbpp_plus",)),
    Task("LiveCodeBench", "code", 0.0),
    Task("MT-Bench coding", "code", None, (), ("MT-Bench-style coding",)),
    # chat: instruction following and dialogue
    Task("IFEval", "chat", None, ("ifeval", "leaderboard_ifeval"),
         ("IFEval (leaderboard)", "IFEval inst-level strict", "IFEval prompt-level strict", "IFEval inst_strict",
          "IFEval prompt_strict")),
    Task("MT-Bench turn 1", "chat", None, (), ("MT-Bench turn1",)),
    Task("MT-Bench turn 2", "chat", None, (), ("MT-Bench turn2",)),
    Task("MT-Bench extraction", "chat", None, (), ("MT-Bench-style extraction",)),
    Task("MT-Bench humanities", "chat", None, (), ("MT-Bench-style humanities",)),
    # language modelling
    Task("LAMBADA-openai", "language_modeling", 0.0, ("lambada_openai",)),
    Task("LAMBADA-standard", "language_modeling", 0.0, ("lambada_standard",)),
    Task("LAMBADA", "language_modeling", 0.0, (), ()),  # variant not stated by the source
    Task("WikiText", "language_modeling", None, ("wikitext",)),
]}

_BY_NAME = {}
for _t in TASKS.values():
    for _n in (_t.name, *_t.aliases):
        _BY_NAME[_n.casefold()] = _t
_BY_LM_EVAL = {i: t for t in TASKS.values() for i in t.lm_eval_ids}


def task_by_name(name: str) -> Task | None:
    """Task for a normalised name or a published spelling (case-insensitive)."""
    return _BY_NAME.get(name.strip().casefold())


def task_by_lm_eval_id(task_id: str) -> Task | None:
    return _BY_LM_EVAL.get(task_id)
