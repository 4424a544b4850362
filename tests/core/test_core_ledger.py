"""Ledger arithmetic: example tests per rule and error, and a stateful conservation test."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from resultity_core._errors import (
    AccountExistsError,
    ChargeExceedsReservationError,
    DuplicateReservationError,
    InsufficientCreditsError,
    InvalidAmountError,
    UnknownAccountError,
    UnknownReservationError,
)
from resultity_core._ledger import (
    PLATFORM_ACCOUNT,
    LedgerState,
    Reservation,
    credit,
    ledger_total,
    open_account,
    release,
    reserve,
    settle,
)


def _ledger() -> LedgerState:
    state = open_account(LedgerState(), PLATFORM_ACCOUNT)
    state = open_account(state, "alice", 1_000)
    return open_account(state, "owner")


def test_open_and_credit_mint_and_are_counted() -> None:
    state = _ledger()
    assert state.balance("alice") == 1_000
    assert state.minted == 1_000
    state = credit(state, "owner", 250)
    assert state.balance("owner") == 250
    assert state.minted == 1_250 == ledger_total(state)


def test_operations_do_not_mutate_their_argument() -> None:
    before = _ledger()
    after = reserve(before, "r1", "alice", 400)
    assert before.balance("alice") == 1_000
    assert dict(before.reservations) == {}
    assert after.balance("alice") == 600
    assert after.reservations["r1"] == Reservation("r1", "alice", 400)
    with pytest.raises(TypeError):
        after.balances["alice"] = 5  # type: ignore[index]


def test_reserve_takes_balance_and_keeps_total() -> None:
    state = reserve(_ledger(), "r1", "alice", 1_000)
    assert state.balance("alice") == 0
    assert state.reserved("alice") == 1_000
    assert ledger_total(state) == state.minted == 1_000


def test_reserve_beyond_balance_is_refused() -> None:
    state = reserve(_ledger(), "r1", "alice", 600)
    with pytest.raises(InsufficientCreditsError) as info:
        reserve(state, "r2", "alice", 401)
    assert info.value.account == "alice"
    assert info.value.balance == 400
    assert info.value.requested == 401


def test_duplicate_reservation_id_is_refused_even_for_another_account() -> None:
    state = credit(reserve(_ledger(), "r1", "alice", 10), "owner", 100)
    with pytest.raises(DuplicateReservationError):
        reserve(state, "r1", "owner", 10)


def test_settle_splits_charge_by_basis_points_and_refunds_rest() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    state, s = settle(state, "r1", 333, "owner", payee_share_bps=8_000)
    # 333 * 0.8 = 266.4 -> the payee gets the floor, the platform the remainder.
    assert (s.payer_charge, s.payee_amount, s.platform_amount, s.refunded) == (333, 266, 67, 167)
    assert state.balance("alice") == 1_000 - 333
    assert state.balance("owner") == 266
    assert state.balance(PLATFORM_ACCOUNT) == 67
    assert "r1" not in state.reservations
    assert ledger_total(state) == state.minted == 1_000


def test_settle_with_explicit_payee_amount() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    state, s = settle(state, "r1", 100, "owner", payee_amount=100)
    assert (s.payee_amount, s.platform_amount) == (100, 0)
    assert state.balance("owner") == 100
    assert state.balance("alice") == 900


def test_settle_payee_amount_above_charge_is_refused() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    with pytest.raises(InvalidAmountError) as info:
        settle(state, "r1", 100, "owner", payee_amount=101)
    assert info.value.field == "payee_amount"


def test_settle_needs_exactly_one_share_form() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    with pytest.raises(InvalidAmountError, match="exactly one"):
        settle(state, "r1", 100, "owner")
    with pytest.raises(InvalidAmountError, match="exactly one"):
        settle(state, "r1", 100, "owner", payee_share_bps=1, payee_amount=1)


def test_settle_share_above_100_percent_is_refused() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    with pytest.raises(InvalidAmountError) as info:
        settle(state, "r1", 100, "owner", payee_share_bps=10_001)
    assert info.value.field == "payee_share_bps"


def test_charge_above_reservation_is_refused_by_default() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    with pytest.raises(ChargeExceedsReservationError):
        settle(state, "r1", 501, "owner", payee_share_bps=5_000)
    # Refusal changed nothing: the reservation is still open.
    assert state.reservations["r1"].amount == 500


def test_charge_above_reservation_capped_when_asked() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    state, s = settle(state, "r1", 9_999, "owner", payee_share_bps=5_000, cap_to_reservation=True)
    assert (s.payer_charge, s.payee_amount, s.platform_amount, s.refunded) == (500, 250, 250, 0)
    assert state.balance("alice") == 500


def test_settle_unknown_reservation_and_unknown_accounts() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    with pytest.raises(UnknownReservationError):
        settle(state, "nope", 1, "owner", payee_share_bps=1)
    with pytest.raises(UnknownAccountError):
        settle(state, "r1", 1, "mallory", payee_share_bps=1)
    with pytest.raises(UnknownAccountError):
        settle(state, "r1", 1, "owner", payee_share_bps=1, platform_account="elsewhere")


def test_settled_reservation_cannot_be_settled_or_released_again() -> None:
    state = reserve(_ledger(), "r1", "alice", 500)
    state, _ = settle(state, "r1", 10, "owner", payee_share_bps=10_000)
    with pytest.raises(UnknownReservationError):
        settle(state, "r1", 10, "owner", payee_share_bps=10_000)
    with pytest.raises(UnknownReservationError):
        release(state, "r1")


def test_release_returns_everything() -> None:
    state = release(reserve(_ledger(), "r1", "alice", 700), "r1")
    assert state.balance("alice") == 1_000
    assert not state.reservations
    with pytest.raises(UnknownReservationError):
        release(state, "r1")


def test_accounts_unknown_and_duplicate() -> None:
    state = _ledger()
    with pytest.raises(AccountExistsError):
        open_account(state, "alice")
    with pytest.raises(UnknownAccountError):
        credit(state, "bob", 1)
    with pytest.raises(UnknownAccountError):
        reserve(state, "r1", "bob", 1)
    with pytest.raises(UnknownAccountError, match="bob"):
        state.balance("bob")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: credit(s, "alice", -1), "amount"),
        (lambda s: credit(s, "alice", 1.0), "amount"),
        (lambda s: credit(s, "alice", True), "amount"),
        (lambda s: credit(s, "", 1), "account"),
        (lambda s: credit(s, 7, 1), "account"),
        (lambda s: open_account(s, "x", -5), "initial"),
        (lambda s: reserve(s, "r1", "alice", 2.5), "amount"),
        (lambda s: reserve(s, "", "alice", 1), "reservation_id"),
        (lambda s: reserve(s, "r1", "alice", False), "amount"),
        (lambda s: settle(s, "r0", -1, "owner", payee_share_bps=1), "charge"),
        (lambda s: settle(s, "r0", 1, "owner", payee_share_bps=0.5), "payee_share_bps"),
        (lambda s: settle(s, "r0", 1, "owner", payee_amount=True), "payee_amount"),
        (lambda s: settle(s, "r0", 1, "owner", payee_amount=-1), "payee_amount"),
        (lambda s: settle(s, "r0", 1, "", payee_amount=1), "payee_account"),
        (lambda s: release(s, None), "reservation_id"),
    ],
)
def test_bad_arguments_name_the_field(call, field) -> None:
    state = reserve(_ledger(), "r0", "alice", 10)
    with pytest.raises(InvalidAmountError) as info:
        call(state)
    assert info.value.field == field


def test_rebuilt_state_is_checked() -> None:
    with pytest.raises(InvalidAmountError) as info:
        LedgerState(balances={"a": 5}, minted=4)
    assert info.value.field == "minted"
    with pytest.raises(InvalidAmountError) as info:
        LedgerState(balances={"a": -1}, minted=-1)
    assert info.value.field == "minted"
    with pytest.raises(InvalidAmountError) as info:
        LedgerState(balances={"a": -1, "b": 2}, minted=1)
    assert info.value.field == "balances['a']"
    with pytest.raises(InvalidAmountError) as info:
        LedgerState(balances={"a": 0}, reservations={"r": Reservation("r", "zed", 1)}, minted=1)
    assert info.value.field == "reservations['r'].account"
    good = LedgerState(balances={"a": 3}, reservations={"r": Reservation("r", "a", 2)}, minted=5)
    assert release(good, "r").balance("a") == 5


ACCOUNTS = ("a", "b", "c", PLATFORM_ACCOUNT)
amounts = st.integers(min_value=0, max_value=10_000)


class LedgerMachine(RuleBasedStateMachine):
    """Random reserve/settle/release/credit sequences against a naive model of the ledger."""

    reservation_ids = Bundle("reservation_ids")

    def __init__(self) -> None:
        super().__init__()
        self.state = LedgerState()
        self.minted = 0
        self.model_reservations: dict[str, tuple[str, int]] = {}
        self.counter = 0
        self.closed: list[str] = []

    @initialize(initial=st.lists(amounts, min_size=len(ACCOUNTS), max_size=len(ACCOUNTS)))
    def open_accounts(self, initial: list[int]) -> None:
        for account, amount in zip(ACCOUNTS, initial, strict=True):
            self.state = open_account(self.state, account, amount)
            self.minted += amount

    @rule(account=st.sampled_from(ACCOUNTS), amount=amounts)
    def do_credit(self, account: str, amount: int) -> None:
        self.state = credit(self.state, account, amount)
        self.minted += amount

    @rule(target=reservation_ids, account=st.sampled_from(ACCOUNTS), amount=amounts)
    def do_reserve(self, account: str, amount: int) -> str:
        self.counter += 1
        rid = f"r{self.counter}"
        balance = self.state.balance(account)
        if amount > balance:
            with pytest.raises(InsufficientCreditsError):
                reserve(self.state, rid, account, amount)
            amount = balance
        self.state = reserve(self.state, rid, account, amount)
        self.model_reservations[rid] = (account, amount)
        return rid

    @rule(rid=reservation_ids, account=st.sampled_from(ACCOUNTS))
    def do_reserve_duplicate(self, rid: str, account: str) -> None:
        if rid in self.model_reservations:
            with pytest.raises(DuplicateReservationError):
                reserve(self.state, rid, account, 0)

    @rule(
        rid=consumes(reservation_ids),
        charge=amounts,
        payee=st.sampled_from(ACCOUNTS),
        bps=st.integers(min_value=0, max_value=10_000),
        cap=st.booleans(),
    )
    def do_settle(self, rid: str, charge: int, payee: str, bps: int, cap: bool) -> None:
        payer, reserved = self.model_reservations.pop(rid)
        self.closed.append(rid)
        before = dict(self.state.balances)
        if charge > reserved and not cap:
            with pytest.raises(ChargeExceedsReservationError):
                settle(self.state, rid, charge, payee, payee_share_bps=bps)
            charge = reserved
        self.state, s = settle(
            self.state, rid, charge, payee, payee_share_bps=bps, cap_to_reservation=cap
        )
        assert s.payer_charge == min(charge, reserved)
        assert s.payee_amount + s.platform_amount == s.payer_charge
        assert s.refunded == reserved - s.payer_charge
        expected = dict(before)
        expected[payer] += s.refunded
        expected[payee] += s.payee_amount
        expected[PLATFORM_ACCOUNT] += s.platform_amount
        assert dict(self.state.balances) == expected

    @rule(rid=consumes(reservation_ids))
    def do_release(self, rid: str) -> None:
        payer, reserved = self.model_reservations.pop(rid)
        self.closed.append(rid)
        before = self.state.balance(payer)
        self.state = release(self.state, rid)
        assert self.state.balance(payer) == before + reserved

    @precondition(lambda self: bool(self.closed))
    @rule(data=st.data())
    def closed_reservation_is_refused(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.closed))
        with pytest.raises(UnknownReservationError):
            release(self.state, rid)
        with pytest.raises(UnknownReservationError):
            settle(self.state, rid, 0, "a", payee_amount=0)

    @invariant()
    def total_is_conserved(self) -> None:
        assert ledger_total(self.state) == self.state.minted == self.minted

    @invariant()
    def nothing_is_negative(self) -> None:
        assert all(v >= 0 for v in self.state.balances.values())
        assert all(r.amount >= 0 for r in self.state.reservations.values())

    @invariant()
    def reservations_match_the_model(self) -> None:
        got = {rid: (r.account, r.amount) for rid, r in self.state.reservations.items()}
        assert got == self.model_reservations


TestLedgerMachine = LedgerMachine.TestCase
