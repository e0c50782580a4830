"""Handlers for the config tests (imported by the check's probe, never by pytest)."""

print("fixture_handlers: printing at import must not confuse the import check")


async def handle(envelope: object) -> None:
    return None


def sync_handle(envelope: object) -> None:
    return None


class AsyncCallable:
    async def __call__(self, envelope: object) -> None:
        return None


callable_object = AsyncCallable()
NOT_CALLABLE = 42
