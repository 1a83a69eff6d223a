"""CPU kernel selection and default schedules (int8 dot-product tensorization, parallel loops)."""


def kernel_relax_passes(target) -> list:
    """Relax-level passes that choose int8 kernel layouts (e.g. pack weights), run before legalization."""
    return []


def schedule_passes(target) -> list:
    """TIR-level passes, run after FuseTIR, that give every PrimFunc a good default schedule for `target`."""
    return []
