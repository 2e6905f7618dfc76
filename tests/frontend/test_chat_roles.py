"""A chat message's role must be one the model's chat template takes: "wizard" is refused with the
roles listed, instead of being rendered silently into the prompt."""

from __future__ import annotations

import pytest

from frontend.tokenizer import STANDARD_ROLES, Tokenizer, UnknownRole, chat_roles, check_roles
from shared.models import resolve_model


def test_a_template_that_names_a_role_takes_it():
    template = "{% if message['role'] == 'ipython' %}x{% elif message.role == \"tool\" %}y{% endif %}"
    assert chat_roles(template) == STANDARD_ROLES | {"ipython"}
    check_roles([{"role": "ipython", "content": "{}"}], chat_roles(template))


def test_an_unknown_role_is_refused_with_the_roles_listed():
    with pytest.raises(UnknownRole) as e:
        check_roles([{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}], chat_roles(""))
    assert "messages[1].role 'wizard'" in str(e.value) and "assistant, developer, system, tool, user" in str(e.value)


def test_the_default_model_refuses_wizard_and_takes_the_standard_roles():
    tokenizer = Tokenizer(resolve_model("default"))
    ids = tokenizer.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids
    with pytest.raises(UnknownRole, match="wizard"):
        tokenizer.encode_chat([{"role": "wizard", "content": "Hi"}])
