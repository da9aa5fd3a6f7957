//! The protocol frontends built into this `ferry`.

use std::sync::Arc;

use ferry_core::frontend::Frontend;

use crate::config::{AmqpConfig, MqttConfig};

/// One instance of every built-in frontend, for [`ServerBuilder::frontend`](crate::ServerBuilder::frontend),
/// with `[amqp]` at its defaults.
pub fn builtin(mqtt: &MqttConfig) -> Vec<Arc<dyn Frontend>> {
    builtin_with(mqtt, &AmqpConfig::default())
}

/// One instance of every built-in frontend, configured by `[mqtt]` and `[amqp]`.
pub fn builtin_with(mqtt: &MqttConfig, amqp: &AmqpConfig) -> Vec<Arc<dyn Frontend>> {
    let settings = ferry_mqtt::Settings {
        queue_qos0_offline: mqtt.queue_qos0_offline,
        max_inflight: mqtt.max_inflight,
        receive_maximum: mqtt.receive_maximum,
        topic_alias_maximum: mqtt.topic_alias_maximum,
        max_keep_alive: mqtt.max_keep_alive,
        max_queued_messages: mqtt.max_queued_messages,
        max_subscriptions_per_client: mqtt.max_subscriptions_per_client,
        max_subscriptions_per_packet: mqtt.max_subscriptions_per_packet,
        sys_interval: std::time::Duration::from_secs(mqtt.sys_interval.into()),
        ..ferry_mqtt::Settings::default()
    };
    let amqp = ferry_amqp::connection::Settings {
        channel_max: amqp.channel_max,
        consumer_max_per_channel: amqp.consumer_max_per_channel,
        max_message_size: amqp.max_message_size,
        ..ferry_amqp::connection::Settings::default()
    };
    vec![Arc::new(ferry_mqtt::MqttFrontend::new(settings)), Arc::new(ferry_amqp::AmqpFrontend::new(amqp))]
}
