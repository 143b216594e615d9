"""The engine core: arena, cache policy, model runner, scheduler, sampler, and the step loop body.

What runs next to the device. Nothing here knows how it is hosted (sinkcache.host) or served.
"""
