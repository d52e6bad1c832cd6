"""Task names, categories, chance levels and test-set sizes, as a data table.

`TASKS` maps a normalised task name to its category, the score a random guesser gets (percent;
None where it is not meaningful), the lm-evaluation-harness task ids that mean the same task, the
spellings used by published sources, and the number of items in the benchmark's standard test set
(`n_items`; None where it is not meaningful: averages over tasks, judge scores, perplexity, or a
size that varies between releases). `n_items` is what a binomial standard error is imputed from
when a row gives neither a standard error nor its own item count.
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
    n_items: int | None = None  # standard test-set size (e.g. GSM8K test 1319); None where not meaningful


TASKS: dict[str, Task] = {t.name: t for t in [
    # knowledge
    Task("MMLU", "knowledge", 25.0, ("mmlu", "mmlu_flan_n_shot_generative"), ("MMLU (5-shot)",), n_items=14042),
    Task("MMLU-Pro", "knowledge", 10.0, ("mmlu_pro", "leaderboard_mmlu_pro"),
         ("MMLU-Pro (leaderboard)", "MMLU-Pro (leaderboard, 5-shot)"), n_items=12032),
    Task("OpenBookQA", "knowledge", 25.0, ("openbookqa",), n_items=500),
    Task("TruthfulQA-MC1", "knowledge", 22.0, ("truthfulqa_mc1",), ("TruthfulQA-mc1",), n_items=817),
    Task("TruthfulQA-MC2", "knowledge", None, ("truthfulqa_mc2",), n_items=817),
    Task("C-Eval", "knowledge", 25.0, ("ceval-valid", "ceval"), ("C-Eval-valid",), n_items=1346),
    Task("CMMLU", "knowledge", 25.0, ("cmmlu",)),
    Task("IQuiz", "knowledge", 25.0, (), ("IQuiz (Chinese)",)),
    Task("TriviaQA", "knowledge", 0.0, ("triviaqa",)),
    Task("NaturalQuestions", "knowledge", 0.0, ("nq_open",), n_items=3610),
    # FinanceBench: open-book QA over company filings; the answer is a fact (often a number) stated in
    # or computed from the document, so it measures domain knowledge / reading, not instruction following.
    Task("FinanceBench", "knowledge", 0.0, (), ("FinanceBench (open-book)",), n_items=150),
    Task("TruthfulQA-gen", "knowledge", 0.0, ("truthfulqa_gen",), ("TruthfulQA (free-form)",), n_items=817),
    Task("OpenLLM-v1 avg", "knowledge", None),
    # reasoning: commonsense / multiple-choice reasoning
    Task("ARC-Challenge", "reasoning", 25.0, ("arc_challenge",), n_items=1172),
    Task("ARC-Easy", "reasoning", 25.0, ("arc_easy",), n_items=2376),
    Task("HellaSwag", "reasoning", 25.0, ("hellaswag",), n_items=10042),
    Task("PIQA", "reasoning", 50.0, ("piqa",), n_items=1838),
    Task("Winogrande", "reasoning", 50.0, ("winogrande",), n_items=1267),
    Task("BoolQ", "reasoning", 62.2, ("boolq",), n_items=3270),  # majority class ("yes") of the validation split
    Task("RTE", "reasoning", 50.0, ("rte",), n_items=277),
    Task("CommonsenseQA", "reasoning", 20.0, ("commonsense_qa",), n_items=1221),
    Task("StrategyQA", "reasoning", 50.0),
    Task("GPQA", "reasoning", 25.0, ("gpqa_main_zeroshot", "gpqa_main_n_shot", "leaderboard_gpqa_main"), n_items=448),
    Task("GPQA-Diamond", "reasoning", 25.0, ("gpqa_diamond_zeroshot", "gpqa_diamond_n_shot", "leaderboard_gpqa_diamond"), n_items=198),
    Task("MuSR", "reasoning", None, ("leaderboard_musr",), n_items=756),
    Task("BBH", "reasoning", None, ("bbh", "leaderboard_bbh")),
    Task("DROP", "reasoning", 0.0, ("drop",), n_items=9536),
    Task("lm-eval avg10", "reasoning", None, (),
         ("avg10 (lambada,hellaswag,piqa,winogrande,tqa_mc1,obqa,boolq,arc_e,arc_c,mmlu)",)),
    Task("avg6 commonsense", "reasoning", None),
    Task("MT-Bench reasoning", "reasoning", None, (), ("MT-Bench-style reasoning",)),
    # math
    Task("GSM8K", "math", 0.0, ("gsm8k", "gsm8k_cot"), ("GSM8K (strict)", "GSM8K 5-shot", "GSM8K 5-shot strict"), n_items=1319),
    Task("MATH-500", "math", 0.0, (), ("MATH 500",), n_items=500),
    Task("MATH", "math", 0.0, ("minerva_math", "hendrycks_math", "leaderboard_math_hard"), n_items=5000),
    Task("AIME-2024", "math", 0.0, (), ("AIME 2024",), n_items=30),
    Task("AIME-90", "math", 0.0, n_items=90),
    Task("MT-Bench math", "math", None, (), ("MT-Bench-style math",)),
    # code
    Task("HumanEval", "code", 0.0, ("humaneval",), n_items=164),
    Task("MBPP", "code", 0.0, ("mbpp",), n_items=500),
    Task("MBPP+", "code", 0.0, ("mbpp_plus",), n_items=378),
    Task("LiveCodeBench", "code", 0.0),
    # Orbiter/project-euler-llm-benchmark: Project Euler problems 1-100, difficulty-weighted solve score
    Task("PE-Bench-Python-100", "code", 0.0, (), ("PE-Bench-Python-100 (Project Euler 1-100, code generation)",), n_items=100),
    Task("PE-Bench-Java-100", "code", 0.0, (), ("PE-Bench-Java-100 (Project Euler 1-100, code generation)",), n_items=100),
    Task("PE-Bench-Rust-100", "code", 0.0, (), ("PE-Bench-Rust-100 (Project Euler 1-100, code generation)",), n_items=100),
    Task("PE-Bench-Clojure-100", "code", 0.0, (), ("PE-Bench-Clojure-100 (Project Euler 1-100, code generation)",), n_items=100),
    Task("MT-Bench coding", "code", None, (), ("MT-Bench-style coding",)),
    # chat: instruction following and dialogue
    Task("IFEval", "chat", None, ("ifeval", "leaderboard_ifeval"),
         ("IFEval (leaderboard)", "IFEval inst-level strict", "IFEval prompt-level strict", "IFEval inst_strict",
          "IFEval prompt_strict"), n_items=541),
    Task("MT-Bench turn 1", "chat", None, (), ("MT-Bench turn1",)),
    Task("MT-Bench turn 2", "chat", None, (), ("MT-Bench turn2",)),
    Task("MT-Bench extraction", "chat", None, (), ("MT-Bench-style extraction",)),
    Task("MT-Bench humanities", "chat", None, (), ("MT-Bench-style humanities",)),
    # language modelling
    Task("LAMBADA-openai", "language_modeling", 0.0, ("lambada_openai",), n_items=5153),
    Task("LAMBADA-standard", "language_modeling", 0.0, ("lambada_standard",), n_items=5153),
    Task("LAMBADA", "language_modeling", 0.0, (), (), n_items=5153),  # variant not stated by the source
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
