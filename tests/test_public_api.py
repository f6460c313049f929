import sync


def test_public_api_is_pinned() -> None:
    assert sorted(sync.__all__) == sorted(
        [
            "BadInputError",
            "BadJobError",
            "Batch",
            "BatchResult",
            "BatchStatus",
            "ExitCode",
            "FatalPlatformError",
            "Operation",
            "Phase",
            "PlatformError",
            "PushSyncError",
            "RejectedBatchError",
            "RejectedRow",
            "RetryableError",
            "RowRef",
            "SecretError",
            "StateError",
            "__version__",
        ]
    )
    for name in sync.__all__:
        assert hasattr(sync, name)
