"""sync.redact: what a URL makes secret. Its key is masked, in pieces too; its scheme, host, port, user and
database are not, so what a platform answers keeps them (every 8-character run of a registered secret is
masked there: :func:`sync.redact.redact_pieces`)."""

from __future__ import annotations

from sync.redact import redact, redact_pieces, register_secret, register_url


def test_a_secret_registered_without_pieces_is_masked_whole_only() -> None:
    register_secret("whole-only-kept-value", pieces=False)
    assert redact("it said whole-only-kept-value") == "it said ***"
    assert redact_pieces("it said whole-only-kept") == "it said whole-only-kept"
    register_secret("pieces-too-kept-value")
    assert redact_pieces("it said pieces-too-kept") == "it said ***"


def test_a_database_url_makes_its_password_and_credential_parameters_secret_not_its_host_or_database() -> (
    None
):
    url = "postgresql://crm:Pw%2Fdb-kept-secret@crm-db.internal:5432/customers?sslmode=require&sslkey=/etc/crm.key"
    register_url(url)
    answer = (
        "User customers_42 not found at https://crm-db.internal:5432/docs (sslmode=require, /etc/crm.key)"
    )
    assert redact_pieces(answer) == answer
    assert redact(f"connecting to {url}") == "connecting to ***"
    assert redact("said Pw/db-kept-secret and Pw%2Fdb-kept-secret") == "said *** and ***"
    assert "kept-sec" not in redact_pieces("the server echoed db-kept-secr")

    register_url(
        "postgresql://crm-db.internal/customers?user=crm&password=Param-kept-phrase&access_token=Tok-kept-0123"
    )
    assert redact("Param-kept-phrase / Tok-kept-0123") == "*** / ***"
    assert redact_pieces("User customers_43 at crm-db.internal") == "User customers_43 at crm-db.internal"


def test_a_webhook_url_makes_its_long_path_segments_secret_not_its_scheme_or_host() -> None:
    url = "https://hooks.chat.example/services/T0123/B0456/WebhookKeyKept0123456789"
    register_url(url, secret_path=True)
    answer = "see https://hooks.chat.example/services for the services we offer"
    assert redact_pieces(answer) == answer
    assert redact(f"posting to {url} failed") == "posting to *** failed"
    assert redact("POST /services/T0123/B0456/WebhookKeyKept0123456789") == "POST ***"
    assert redact_pieces("the key WebhookKeyKept01 was refused") == "the key *** was refused"
    register_url(
        "https://chat.example/v1/spaces/AAA/messages?key=KeyParamKept-1&token=TokenParamKept-2",
        secret_path=True,
    )
    assert redact("KeyParamKept-1 TokenParamKept-2") == "*** ***"


def test_a_url_that_does_not_parse_keeps_its_password_secret_in_pieces_or_all_of_it() -> None:
    url = "postgresql://crm:Unparsed-kept-pw@[::1:5432/db-unparsed-url"
    register_url(url)
    assert redact(url) == "***"
    assert redact_pieces("it echoed Unparsed-kept") == "it echoed ***"
    assert redact_pieces("[::1:5432/db-unparsed") == "[::1:5432/db-unparsed"
    # No password to tell apart (or a query that may hold one): all of it, in pieces too.
    register_url("postgresql://[::1/db-Unparsable-kept-url?sslpassword=x")
    assert "Unparsab" not in redact_pieces("db-Unparsable-kept")
