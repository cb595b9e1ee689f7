"""``memory_budget``: the byte model of a layer's state, the allocation of ranks under a budget, and the
``RankBudget`` that decides them at refreshes.
"""
