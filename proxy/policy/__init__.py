"""Per-tier policies: who may call, what they may use, how much, and in which order.

Modules: ``schema`` (the YAML file), ``loader`` (folder -> PolicySet, errors with file:line
field), ``policyset`` (authenticate, model allow-list, max_tokens cap), ``keys`` (hashing),
``store`` (hot reload), ``limits`` / ``redis_limits`` (rate, tokens, concurrency, budget),
``admission`` (per-engine cap + priority queue), ``errors`` (refusals), ``commands`` (CLI).

Per request, in this order (each step raises a :mod:`proxy.policy.errors` refusal)::

    policies = store.current                                   # one consistent set per request
    principal = policies.authenticate(bearer_token(auth_header))         # 401
    model = resolve_model(principal.policy, body.get("model"))           # 403
    max_tokens = cap_max_tokens(principal.policy, body.get("max_tokens"))  # clamp or 400
    prompt_bound = prompt_token_bound(texts_of_the_prompt)
    async with limiter.admit(principal, prompt_tokens=prompt_bound) as ticket:  # 429 rpm/tpm/conc.
        ...embed, route, cache lookup (a hit costs no budget and takes no engine slot)...
        async with ticket.budget(worst_case_usd(engine.cost, prompt_bound, max_tokens.value)) \\
                as spend:                                                 # 429 insufficient_quota
            async with admissions[engine.name].slot(
                priority=principal.policy.priority,
                max_wait_s=principal.policy.queue.max_wait_ms / 1000,
                tier=principal.tier,
            ):                                                            # 503 engine_overloaded
                answer = await call_engine(...)
                spend.record(engine.cost.usd(usage.prompt_tokens, usage.completion_tokens))
        ticket.record_usage(usage.prompt_tokens, usage.completion_tokens)
"""
