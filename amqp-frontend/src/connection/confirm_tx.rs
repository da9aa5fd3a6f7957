//! Publisher confirms (confirm.select) and transactions (tx.select, commit, rollback), and
//! the confirm or commit-ok sent once a store commit resolves.

use ferry_core::message::Millis;

use super::Connection;
use crate::channel::{PendingConfirm, TxOp};
use crate::codec::{
    reply_code, BasicAck, BasicNack, ConfirmSelect, ConfirmSelectOk, Method, TxCommitOk, TxRollbackOk, TxSelectOk,
};
use crate::errors::AmqpError;

impl Connection {
    pub(super) fn on_confirm_select(&mut self, ch: u16, s: ConfirmSelect) -> Result<(), AmqpError> {
        let c = self.channel(ch);
        if c.tx.is_some() {
            return Err(AmqpError::new(reply_code::PRECONDITION_FAILED, "cannot switch from tx to confirm mode"));
        }
        if c.confirm_seq.is_none() {
            c.confirm_seq = Some(1);
        }
        if !s.nowait {
            self.send(ch, Method::ConfirmSelectOk(ConfirmSelectOk {}));
        }
        Ok(())
    }

    pub(super) fn on_tx_select(&mut self, ch: u16) -> Result<(), AmqpError> {
        let c = self.channel(ch);
        if c.confirm_seq.is_some() {
            return Err(AmqpError::new(reply_code::PRECONDITION_FAILED, "cannot switch from confirm to tx mode"));
        }
        if c.tx.is_none() {
            c.tx = Some(Vec::new());
        }
        self.send(ch, Method::TxSelectOk(TxSelectOk {}));
        Ok(())
    }

    pub(super) fn on_tx_commit(&mut self, ch: u16, now: Millis) -> Result<(), AmqpError> {
        let Some(ops) = self.channel(ch).tx.as_mut().map(std::mem::take) else {
            return Err(AmqpError::new(reply_code::PRECONDITION_FAILED, "channel is not transactional"));
        };
        // commit-ok follows once the published messages (and the acks) are durable; a
        // commit that fails closes the channel instead (see `confirm_done`).
        let mut commit = ferry_core::store::Commit::done(Ok(()));
        for op in ops {
            let c = match op {
                TxOp::Publish { message, mandatory } => self.route(ch, *message, mandatory, now)?,
                TxOp::Ack { tag, multiple } => self.settle_commit(ch, tag, multiple, None, now)?,
                TxOp::Reject { tag, multiple, requeue } => self.settle_commit(ch, tag, multiple, Some(requeue), now)?,
            };
            commit = commit.join(c);
        }
        let commit = commit.join(self.vhost().store().flush());
        let owner = self.channel(ch).owner;
        self.pending.push(PendingConfirm { channel: ch, owner, seq: 0, nack: false }, commit);
        Ok(())
    }

    pub(super) fn on_tx_rollback(&mut self, ch: u16) -> Result<(), AmqpError> {
        match self.channel(ch).tx.as_mut() {
            Some(ops) => ops.clear(),
            None => return Err(AmqpError::new(reply_code::PRECONDITION_FAILED, "channel is not transactional")),
        }
        self.send(ch, Method::TxRollbackOk(TxRollbackOk {}));
        Ok(())
    }

    /// Sends a confirm (or tx.commit-ok, seq 0) whose commit resolved. A failed commit (the
    /// store could not write: a full or failing disk) is a basic.nack, or for tx.commit the
    /// channel error RabbitMQ gives a transaction that did not complete (406 "partial tx
    /// completion").
    pub fn confirm_done(&mut self, p: PendingConfirm, ok: bool, now: Millis) {
        if self.channels.get(&p.channel).is_none_or(|c| c.closing || c.owner != p.owner) {
            return;
        }
        if p.seq == 0 {
            if ok {
                self.send(p.channel, Method::TxCommitOk(TxCommitOk {}));
            } else {
                let e = AmqpError::new(reply_code::PRECONDITION_FAILED, "partial tx completion").on(90, 20);
                self.close_channel(p.channel, &e, now);
            }
            return;
        }
        if p.nack || !ok {
            self.send(p.channel, Method::BasicNack(BasicNack { delivery_tag: p.seq, multiple: false, requeue: false }));
        } else {
            self.send(p.channel, Method::BasicAck(BasicAck { delivery_tag: p.seq, multiple: false }));
        }
    }

    /// Sends the confirms whose commits have resolved, in order: one whose commit is done
    /// waits for those before it.
    pub fn take_ready_confirms(&mut self, now: Millis) {
        while let Some((p, result)) = self.pending.take_ready() {
            self.confirm_done(p, result.is_ok(), now);
        }
    }
}
