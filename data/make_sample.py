#!/usr/bin/env python3
"""Write the shipped sample dataset: data/raw/support_tickets.jsonl.

Task: a customer-support message in, a compact JSON triage record out, so that fine-tuning
visibly changes what a small instruction model does (a fixed output format and label set).

    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "<customer message>"},
                  {"role": "assistant", "content": "{\"category\": ..., \"summary\": ...}"}],
     "ticket_id": "T-000123"}

The labels are learnable from the message: the category follows the problem described, the
product is named or strongly implied, the priority follows explicit cues (outage / whole team down
-> urgent; "can't use it", "need it fixed today" -> high; "annoying but I can work around it" ->
medium; "no rush", "would be nice" -> low; no cue -> the usual priority of that kind of problem),
and the sentiment follows the tone (complaints -> negative, praise -> positive, plain -> neutral).

On top of ~1800 natural rows the file carries the defects real exports have, placed with a fixed
seed so that every rule of the clean, dedup and split stages fires (see INJECT below and
data/raw/README.md). Deterministic: the same seed writes the same bytes. Standard library only.

    python data/make_sample.py              # writes data/raw/support_tickets.jsonl, prints a summary
    python data/make_sample.py --schema     # prints the triage record's JSON Schema as YAML
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

SEED = 20240611
OUT = Path(__file__).resolve().parent / "raw" / "support_tickets.jsonl"

SYSTEM = ("Triage the customer message. Reply with only a JSON object with keys "
          "category, priority, product, sentiment, summary.")

CATEGORIES = ["billing", "bug", "account", "shipping", "feature_request", "how_to",
              "cancellation", "security"]
PRIORITIES = ["low", "medium", "high", "urgent"]
PRODUCTS = ["mobile app", "web dashboard", "api", "smart thermostat", "router", "subscription"]
SENTIMENTS = ["positive", "neutral", "negative"]
KEYS = ["category", "priority", "product", "sentiment", "summary"]

# The JSON Schema of the assistant's answer (evaluate.json_schema in params.yaml).
# Summaries in the data are 5-12 words, 25-90 characters; the schema bounds them loosely.
TRIAGE_SCHEMA = {
    "type": "object",
    "required": KEYS,
    "additionalProperties": False,
    "properties": {
        "category": {"type": "string", "enum": CATEGORIES},
        "priority": {"type": "string", "enum": PRIORITIES},
        "product": {"type": "string", "enum": PRODUCTS},
        "sentiment": {"type": "string", "enum": SENTIMENTS},
        "summary": {"type": "string", "minLength": 1, "maxLength": 120},
    },
}

# Rows per injected defect. Natural rows fill the file up to TOTAL lines.
TOTAL = 2000
INJECT = {
    "exact_duplicate": 60,      # an earlier row repeated byte for byte (some adjacent, some far)
    "near_duplicate": 60,       # an earlier message resent, slightly reworded; same answer
    "related_followup": 15,     # the same customer following up: similar (~0.6 Jaccard), not a copy
    "malformed_line": 10,       # truncated / not JSON / not UTF-8 / not an object
    "empty_answer": 10,         # assistant content "" or blank
    "blank_user": 5,            # user content only whitespace
    "overlong": 5,              # a pasted log makes the user message > 4000 characters
    "no_answer": 5,             # the last turn is the user's
    "missing_messages": 3,      # no "messages" key at all
    "non_string_content": 3,    # content is null or a number
}

P_SHORT = {"mobile app": "mobile app", "web dashboard": "dashboard", "api": "API",
           "smart thermostat": "thermostat", "router": "router", "subscription": "subscription"}
CODE = {"M": "mobile app", "W": "web dashboard", "A": "api", "T": "smart thermostat",
        "R": "router", "S": "subscription"}

# How a customer names each product ({P}); never ambiguous between products.
P_PHRASES = {
    "mobile app": ["the Lumio app", "your mobile app", "the app on my {phone}",
                   "the Lumio app ({os})", "your [iPhone|phone] app", "the mobile app"],
    "web dashboard": ["the web dashboard", "your web portal", "the dashboard in {browser}",
                      "the Lumio dashboard", "the online dashboard", "the Lumio web app"],
    "api": ["your API", "the Lumio API", "the REST API", "the v2 API", "your developer API"],
    "smart thermostat": ["my Lumio thermostat", "the smart thermostat", "the thermostat in the {room}",
                         "our Lumio Thermo {tmodel}", "my thermostat", "the Thermo {tmodel}"],
    "router": ["my Lumio router", "the mesh router", "the Lumio Mesh {rmodel}", "our wifi router",
               "the router you sent me", "the {rmodel} router"],
    "subscription": ["my Lumio Plus subscription", "my {plan} subscription", "the {plan} plan",
                     "my Lumio membership", "our Lumio {plan} plan"],
}

# Templates: (products, priorities, message, summary). products: letters of CODE. priorities:
# the first is the priority when the message carries no priority cue. [a|b] picks one option,
# {slot} fills a value (the same value wherever it recurs in one ticket; {P} names the product
# the customer's way, {p} is its short name).
#
# Why so many [a|b] and slots: the split stage audits train against test for shared 13-word
# runs. Fixed phrasing longer than a few words, or summaries that open the same way after the
# identical label prefix ("category ... summary" is 9-10 words), would make unrelated tickets
# look leaked. So summaries carry a detail of their ticket (an amount, date, order, address,
# number) in its first three words, and fixed runs in messages stay short.
TEMPLATES = {
    "billing": [
        ("SA", ["high", "urgent"],
         "I [was|got|have been] charged twice [for|on] {P} [this month|in {month}|last week]: [two payments|2 payments|two charges] of {amount} on {date}[, card ending {last4}|, same card|].",
         "[{amount} charged twice|Double charge of {amount}|Duplicate {amount} payment] for {p} on {date}"),
        ("SATR", ["low", "medium"],
         "[Can|Could] [you|someone] [send me|email me|resend] [a copy of|the PDF of] invoice {invoice} [for|from] {P}? [Our accountant needs it|It's for my expense report|I can't find it in my inbox|The link in the email expired].",
         "[Invoice {invoice} copy requested|Resend invoice {invoice}|Invoice {invoice}: copy needed] for {p}"),
        ("S", ["medium", "high"],
         "{P} [renewed|was renewed|auto-renewed] at {amount} on {date} [instead of|rather than|and not at] the {amount2} [I was quoted|on your pricing page|I paid last year|{agent} promised].",
         "[Renewed at {amount}|Renewal charged {amount}|{amount} renewal] instead of [quoted|expected] {amount2}"),
        ("TR", ["medium", "high"],
         "[The|My] refund for order {order} ({P}, {amount}) [still hasn't|has not yet|never] [reached|arrived in|shown up in] my [account|bank account] after {weeks} weeks.",
         "[Refund of {amount}|{amount} refund] for order {order} [not received|still missing|outstanding]"),
        ("SA", ["low", "medium"],
         "Why did [my|our] [bill|invoice|charge] for {P} [go up to|jump to|become] {amount} in {month}? [Nothing changed on our side|We didn't change anything|Same usage as before|I never upgraded].",
         "[{amount} bill in {month} without usage change|Unexpected {amount} charge in {month}|Bill rose to {amount} in {month}]"),
        ("AWS", ["medium", "high"],
         "[We were|I was|Our team was] billed for {n} seats on {P} but [only {m} people use it|our team is {m} people|we have {m} active users].",
         "[Billed for {n} seats|{n} seats billed|Charged for {n} seats], only {m} [used|active]"),
        ("S", ["medium", "high"],
         "[Updating|Changing|Replacing] my card [for|on] {P} fails with [error|code|the message] {err} [every time|on {browser}|since {date}].",
         "[{err} error|Error {err}|Payment error {err}] [when updating|on changing] card for {p}"),
        ("S", ["medium", "high"],
         "You charged [my old card|the old card|a card] ending {last4} for {P} [even though|although|when] I [added a new one|updated it|replaced it] on {date}.",
         "[Card ending {last4}|Old card {last4}|Expired card {last4}] charged after [update|replacement] on {date}"),
        ("SATR", ["low", "medium"],
         "How do [we|I] get a VAT invoice for [order|purchase] {order} ({P}) with [our company name|the name] {company} [on it|printed on it|and our VAT number]?",
         "[Order {order}|Purchase {order}] needs VAT invoice [for|naming] {company}"),
        ("S", ["high", "medium"],
         "I cancelled the [free trial|trial|30-day trial] [on|back on] {date} but [you still took|I was still charged|your system took] {amount} for {P}.",
         "[{amount} charged|Charged {amount}|{amount} taken] after trial [cancelled|ended] on {date}"),
        ("S", ["low", "medium"],
         "The {pct}% [student|loyalty|teacher|launch] discount [wasn't|was not|never got] applied to {P}[;|,|.] [I was charged|I paid|The invoice says] {amount} [this month|on {date}|in {month}].",
         "[{amount} charged|Charged {amount}|{amount} invoiced] without the {pct}% discount"),
        ("A", ["medium", "high"],
         "[We got|There's|We were charged] an overage fee of {amount} [for|on] {P} on {date}, but [our usage graph|the usage page|our own logs] [shows|say] {n}k calls, [under the limit|well below our quota|within the plan].",
         "[Disputed {amount} overage fee|{amount} overage fee disputed|Overage of {amount} disputed] from {date}"),
        ("STR", ["low", "medium"],
         "What is the {amount} charge [from|labelled|called] LUMIO*{code} on my {month} statement? [Is it|Was that|Could it be] for {P}?",
         "[Unknown {amount} charge|{amount} LUMIO*{code} charge|Unrecognised {amount} charge] on {month} statement"),
        ("S", ["low", "medium"],
         "Please [switch|move|change] {P} from monthly to [annual|yearly] billing [from|starting|as of] {date} and [tell me|let me know|quote] the prorated amount.",
         "[Annual billing from {date}|Yearly billing starting {date}|From {date} annual billing] requested"),
        ("TR", ["high", "urgent"],
         "[I got|My bank shows|I see] {count} pending charges of {amount} for order {order} ({P}), [but I only ordered once|I clicked pay once|only one order went through].",
         "[{amount} charged {count} times for order {order}|{amount} pending {count} times, order {order}]"),
        ("TRS", ["low", "medium"],
         "[Promo code|Voucher|Discount code] {promo} [gave an error|was rejected|didn't work] at checkout for {P}, so I paid [full price|the full {amount}|{amount} instead].",
         "[Code {promo} rejected|{promo} code failed|Promo {promo} not accepted] for {p}"),
        ("SWA", ["high", "urgent"],
         "[Our|The company|My] card was declined for the {plan} renewal on {date} and now {P} [says|shows|reports] the account is [suspended|locked|read-only].",
         "[Renewal declined {date}, account suspended|Card declined {date}, {p} account suspended]"),
        ("SA", ["low", "medium"],
         "Could you explain the line '{line}' on invoice {invoice} for {P}? [I don't remember adding it|We never ordered that|It wasn't there before].",
         "[Invoice {invoice}: query about '{line}'|Invoice {invoice}: explain '{line}' line]"),
        ("SA", ["medium", "high"],
         "[Support|Your agent {agent}|Your colleague {agent}] [promised a credit of {amount}|promised me {amount} in credit|said I'd get {amount} back] after the {month} outage[,| and|, but] it's not on my [bill|invoice] for {P}.",
         "[Promised {amount} outage credit missing|{amount} outage credit not applied|Missing {amount} credit for {month} outage]"),
    ],
    "bug": [
        ("M", ["medium", "high"],
         "{P} crashes [every time|whenever|as soon as] I open the {screen} [screen|tab|page]. [I'm on|Running|Using] {os}, [app version|version|build] {appver}.",
         "[Version {appver}|App {appver}|Build {appver}] crashes [on|opening] {screen} [screen|tab]"),
        ("W", ["medium", "high"],
         "The {chart} chart on {P} [shows no data|is blank|stays empty] since {date} [even though|although|while] {n} devices are [online|connected|reporting].",
         "[Since {date}|From {date}] {chart} chart [shows no data|is blank]"),
        ("A", ["high", "medium", "urgent"],
         "[POST|A POST to|Calling POST] {endpoint} [on|in] {P} [returns|gives|answers] {http} [for a valid payload|with a body that validated before|for {pct}% of requests] {since}.",
         "{since} POST {endpoint} returns {http}"),
        ("T", ["medium", "high"],
         "{P} [keeps resetting|resets itself|jumps back] to {temp} [overnight|every night|around {time}], [no matter what schedule I set|ignoring the {weekday} schedule|even with the schedule off].",
         "[Resets to {temp} overnight|Jumps back to {temp} nightly|{temp} reset every night] despite schedule"),
        ("R", ["high", "urgent"],
         "Since firmware {fw}, {P} [drops wifi|loses the connection|disconnects everything] every {mins} minutes [for all devices|for the {room} satellite|on 5 GHz|on both bands].",
         "[Firmware {fw} drops wifi every {mins} minutes|Wifi drops every {mins} minutes on {fw}|{mins}-minute disconnects since firmware {fw}]"),
        ("M", ["medium", "high"],
         "[Push notifications|Notifications|Alerts] [stopped arriving|no longer arrive|don't come through anymore] on my {phone} after [updating|upgrading] {P} to {appver}.",
         "[{phone}: no push notifications since {appver}|{phone} gets no push notifications after {appver}|Update {appver} stopped notifications on {phone}]"),
        ("W", ["medium", "low"],
         "The [CSV export|Export to CSV|export] [button|link|option] in {P} [downloads|gives me|produces] [an empty file|a 0-byte file|a blank CSV|a file with only headers] [for the range starting {date}|for anything after {date}|when the period starts on {date}].",
         "[Export from {date} gives empty CSV|Range from {date} exports empty CSV|Dates after {date} export empty CSV]"),
        ("A", ["high", "medium"],
         "Webhooks for {event} [fire|are delivered|arrive] twice from {P} [since {date}|starting {date}|from {date} on], so [our system|our CRM|the integration] [creates|ends up with] duplicate [records|tickets|orders].",
         "[Since {date} {event} webhooks arrive twice|From {date} duplicate {event} webhooks]"),
        ("T", ["medium", "low"],
         "{P} [says|shows|displays] {temp} but [reads|is] {deg} degrees [too high|too low|off] [compared with|next to|against] a [separate|plain|cheap] thermometer in the {room}.",
         "[Shows {temp}, actually {deg} degrees off|Displays {temp} but reads {deg} degrees off]"),
        ("R", ["high", "medium"],
         "The light on {P} is {colour} {since} [and|while] the admin page at 192.168.{octet}.1 [won't load|times out|shows {http}].",
         "{since}: {colour} light, admin page unreachable"),
        ("MW", ["low", "medium"],
         "In dark mode the text on the {screen} page of {P} is [unreadable|black on dark grey|almost invisible] {since}.",
         "{since} dark mode hides {screen} page text"),
        ("A", ["medium", "high"],
         "Pagination on GET {endpoint} [skips items|is broken|loses records]: page 2 repeats [{m} rows of page 1|half of page 1|the last {m} items] with limit={n}.",
         "[Limit={n} pagination repeats items on {endpoint}|Pagination at limit {n} broken on {endpoint}]"),
        ("W", ["medium", "low"],
         "[Dates|Timestamps|Days] in the {month} [report|export|summary] [on|from] {P} are [shifted|off|wrong] by one day for [our users|my team|everyone] in {city}.",
         "[In {city}, {month} report dates shifted a day|{city}: {month} report dates off by one day]"),
        ("T", ["high", "medium"],
         "The [display|screen] of {P} froze on the {screen} [screen|page|menu] {since} [and won't respond to touch|and ignores the buttons|].",
         "{since} display frozen on {screen} screen"),
        ("R", ["medium", "low"],
         "Speed tests through {P} [top out|max out|stop] at {speed} Mbps [while|but|whereas] a cable [straight to the modem|directly|to the ONT] gives {speed2}.",
         "[Only {speed} Mbps through router, {speed2} wired|{speed} Mbps max via wifi, {speed2} on cable]"),
        ("M", ["medium", "high"],
         "[The app|{P}] says 'Something went wrong ({err})' [whenever|each time|when] I try to add a second home [in {city}|for my {relative}|called '{project}'].",
         "[Error {err} adding a second home|{err} when adding second home]"),
        ("A", ["high", "medium"],
         "Rate limit headers from {P} say {n} requests remaining, but [we get|we're getting|we still receive] HTTP 429 [since {date}|after {m} calls|every few minutes].",
         "[HTTP 429 with {n} requests remaining|429 errors despite {n} remaining requests|{n} requests left but HTTP 429]"),
        ("W", ["medium", "high"],
         "{P} [logs me out|signs me out|drops my session] every {mins} minutes in {browser} {since}.",
         "[{mins}-minute forced logouts in {browser} on {p}|Every {mins} minutes logged out in {browser}]"),
        ("MT", ["medium", "high"],
         "Geofencing in {P} turned the heating off [while we were home|at {time} with {count} people home|even though I was in the {room}] on {date}.",
         "[{date}: geofencing turned heating off at home|On {date} geofencing wrongly turned heating off]"),
    ],
    "account": [
        ("MW", ["high", "urgent"],
         "I can't log in to {P} {since}: [it says my password is wrong|'invalid credentials'|it just reloads the page] [even after a reset|although I reset it {mins} minutes ago|and the reset email never comes].",
         "{since} login fails despite password reset"),
        ("MWS", ["low", "medium"],
         "Please change the email on my account from {email} to {email2}[, I'm leaving my old job|, the old address closes on {date}|, thanks].",
         "[{email2} should become the account email|{email2}: new account email requested|{email2} replaces old account email]"),
        ("MW", ["high", "medium"],
         "The two-factor code [never arrives|doesn't come|isn't delivered] by SMS to {phonenum}, so I'm locked out of {P} {since}.",
         "[{phonenum} gets no 2FA SMS, locked out|{phonenum} not receiving 2FA codes]"),
        ("WA", ["low", "medium"],
         "Please add {email2} as [an admin|an administrator|a second admin] [on|to] our {p} account[;|.|,] [I'm the owner|I own it|owner here] ([{email}|login {email}|signed in as {email}]).",
         "[{email2} to be added as admin|Add {email2} as account admin]"),
        ("MT", ["high", "medium"],
         "[Since {date}|On {date}|After the update on {date}] my account [got merged with|is linked to|shows] my {relative}'s and [I now see their devices|their {tmodel} shows up|I can change their heating] in {P}.",
         "[Since {date} account shows {relative}'s devices|From {date} account mixed with {relative}'s]"),
        ("MWS", ["low", "medium"],
         "[Under GDPR|As a GDPR access request|Per GDPR article 15|Under data protection law] [I'd like|please send me|I request] [a copy of|an export of|all] [all personal data|my personal data|the data] [you hold|stored|kept] on {email} [in|from|for] {P}.",
         "[{email} requests GDPR data copy|{email}: GDPR access request for personal data]"),
        ("MW", ["medium", "high"],
         "[The|Your] [verification|confirmation|activation] email for {email} never [arrived|came|showed up][,|;|.] [so I can't finish|I can't complete|stuck finishing] [signing up|registration|sign-up] [on|for] {P}[ {since}|].",
         "[{email} never got the verification email|{email} did not receive verification email]"),
        ("MW", ["high", "urgent"],
         "I [got a new|switched to a|lost my phone and now use a] {phone} and [lost|no longer have|can't open] my [authenticator app|2FA app|authenticator codes]. [How do I get back into|How can I access|Please help me into] {P} ({email})?",
         "[{email} locked out after losing authenticator|{email}: authenticator lost with new {phone}]"),
        ("WA", ["medium", "high"],
         "{name2} [left the company|no longer works here|has left us]; [please transfer ownership of|please move|can you reassign] [our|the] {p} workspace '{project}' [to me|to my login|over to me][ ({email})|].",
         "[{name2} left, transfer workspace '{project}'|{name2}'s workspace '{project}' to be transferred]"),
        ("MW", ["low"],
         "My username shows as '{username}' in {P} but I never [chose|picked|set] that. Can it be [changed|renamed] to {name}[{year}|_{last}|]?",
         "[Rename username {username} in {p}|Username {username} change requested by customer|Change username {username} to {name}]"),
        ("MW", ["medium", "high"],
         "[Registering|Signing up with|Creating an account for] {email} on {P} [says|fails with|shows] '[email already in use|this email is taken|account exists]', but I've never [had|created|opened] [an account|a Lumio account|one] [before|with you|in my life].",
         "[{email} reported as already in use|{email} blocked at signup as in use]"),
        ("W", ["urgent", "high"],
         "SSO [through|via|with] {idp} [fails with|returns|gives] '[invalid SAML response|SAML assertion invalid|signature mismatch]' for [everyone in our org|all {n} of our users|the whole {company} team] on {P} {since}.",
         "{since} {idp} SSO fails for whole organisation"),
        ("A", ["low", "medium"],
         "[Can we have|Could we get|We need] a second [key|API key|token] [for|on] {P} [on|for] account {email}? [Our staging environment|The {project} project|Our {city} office] needs [its own|a separate one|one too][,|;|, and] the [dashboard|console|key page] [only allows one|won't create another|greys out the button].",
         "[{email} needs a second API key|{email} asks for an extra API key]"),
        ("MW", ["high", "medium"],
         "My account [is locked|got locked|was blocked] after too many [attempts|login attempts|tries][ and|, so|;] {P} [says|tells me|wants me] to [try again in|wait|come back in] {hours} hours. My login is {email}.",
         "[{email} locked out for {hours} hours|{email} needs unlock after lockout]"),
        ("MWS", ["low"],
         "I [got married|changed my name|had my name changed] [and|so] [would like|need|want] the name on my [account|{p} account|profile] [changed|updated|switched] from {name} {last} to {name} {last2}.",
         "[{name} {last} becomes {name} {last2}|{name} {last2}, formerly {last}, wants name change]"),
        ("M", ["medium", "low"],
         "{P} keeps asking me to verify {phonenum} [even though I did it {count} times|after every update|{since}].",
         "[{phonenum} verification prompt repeats|{phonenum} asked to verify repeatedly]"),
        ("MS", ["low", "medium"],
         "The family invite I sent from {P} to {email2} [expired|ran out|timed out] before [my {relative}|they|she] accepted it. Can you resend it?",
         "[{email2} invite expired before acceptance|{email2} needs a new family invite]"),
    ],
    "shipping": [
        ("TR", ["medium", "high"],
         "Order {order} ({P}) was [due|supposed to arrive|promised for] {date}, but tracking [hasn't moved|hasn't updated|is frozen] [in|for] {days} days.",
         "[Order {order} tracking stuck for {days} days|{order} overdue, tracking frozen for {days} days]"),
        ("TR", ["high", "medium"],
         "{P} arrived [with a cracked|with a broken|with a bent] {part} [today|on {date}|this morning]. [Order|My order is|Order no.] {order}.",
         "[Order {order}: {p} arrived with damaged {part}|{order} arrived with damaged {part}]"),
        ("TR", ["high", "medium"],
         "I ordered {P} ([order|ref] {order}) but the box [contained|had] {wrong}.",
         "[Order {order}: wrong item in box|{order} shipped with the wrong item]"),
        ("TR", ["low", "medium"],
         "Can you ship order {order} ({P}) to my office in {city} instead of [my home address|home|the billing address]? [I'm out all day|Nobody's home weekdays|It's safer there|I work late].",
         "[Order {order} to be redirected to {city} office|Redirect {order} to office in {city}]"),
        ("TR", ["high", "urgent"],
         "{carrier} says [the parcel with {P}|my {p} order|the box with {P}] was delivered on {date}, but nothing [is|was] at my door. Tracking {tracking}.",
         "[Parcel {tracking} marked delivered but missing|{tracking} shown delivered by {carrier}, not received]"),
        ("TR", ["low"],
         "How long does [shipping|delivery] to {country} usually take for {P}? [I want it before {date}|It's a gift for {date}|We move in on {date}].",
         "[Before {date}, asks shipping time to {country}|By {date} wants {p} delivered to {country}]"),
        ("TR", ["medium", "high"],
         "The box for order {order} [came without|was missing|didn't include] the {part} for {P}.",
         "[Order {order} arrived missing the {part}|{order} arrived without the {part}]"),
        ("TR", ["medium", "low"],
         "I paid {amount} for express [shipping|delivery] on order {order} but {P} took {days} days [by standard post|to arrive|with regular mail].",
         "[{amount} express fee, but took {days} days|Order {order}: express paid, {days} days]"),
        ("TR", ["medium", "low"],
         "Order {order} has shown 'label created' since {date}. Has {P} actually [shipped|left your warehouse|been handed to {carrier}]?",
         "[Order {order} stuck at label created|{order} not shipped since {date}]"),
        ("TR", ["high", "medium"],
         "[I just moved|We moved|I'm relocating] to {city}: please change the delivery address on order {order} before {P} ships.",
         "[Order {order} address change to {city}|{city} delivery address for order {order}]"),
        ("TR", ["medium", "low"],
         "[Customs in|The customs office in|Border control in] {country} [want|are asking for|charged me] {amount} in [import fees|duties|import VAT] for {P}. [Is that expected|Is this normal|Should I pay that] [for order {order}|on my order|with DDP shipping]?",
         "[{amount} import fees in {country} for {p}|{amount} customs charge in {country} questioned]"),
        ("TR", ["high", "medium"],
         "The replacement {p} [you promised|{agent} promised|support promised] on {date} [never shipped|hasn't shipped|still isn't here].",
         "[Replacement promised {date} not shipped|{date} replacement {p} never sent]"),
        ("TR", ["medium"],
         "Parcel {tracking} with {P} has been [sitting|stuck|waiting] at the {carrier} depot in {city} for {days} days.",
         "[Parcel {tracking} stuck at {carrier} depot|{tracking} held at {city} depot]"),
        ("TR", ["low"],
         "Can I pick up {P} (order {order}) at [a store|your {city} shop|a pickup point] instead of waiting for [delivery|{carrier}|the courier]?",
         "[Order {order}: store pickup requested|{order} to be collected in store]"),
        ("TR", ["medium", "high"],
         "Only {m} of the {n} [units of {P}|{p}s] in order {order} arrived. Where [is|are] the rest?",
         "[Order {order}: only {m} of {n} arrived|{m} of {n} units missing from order]"),
        ("TR", ["low"],
         "[I'm away|I'll be travelling|We're on holiday] from {date} to {date2}. Could you hold order {order} ({P}) until [I'm back|then|{date2}]?",
         "[Hold order {order} until {date2}|Order {order} to be held until {date2}]"),
        ("TR", ["medium"],
         "{carrier} left {P} [outside in the rain|on the doorstep in the rain|by the bins] on {date} and the box is [soaked|ruined|falling apart].",
         "[On {date} {carrier} left parcel outside|{date}: box left in rain by {carrier}]"),
    ],
    "feature_request": [
        ("MWTR", ["low", "medium"],
         "It would be [nice|great|handy|really useful] if {P} [had|could offer|supported] {feature}. [We have {n} devices on it|We run it across {n} devices|{n} devices here use it].",
         "[{n}-device household wants {feature}|{n} devices: request for {feature}]"),
        ("MWTR", ["low", "medium"],
         "Any plans to support {integration} in {P}? It would save [me|us|our team] {mins} minutes a day[.|!| at least.]",
         "[{mins} minutes a day saved with {integration}|{mins} min/day saving from {integration} support]"),
        ("MWR", ["low", "medium"],
         "Please add an option in {P} to {action}. [I have|We have|Our office has] {n} devices [and it's tedious|so it matters|and it takes ages].",
         "[{n} devices: option to {action}|With {n} devices, wants option to {action}]"),
        ("M", ["low"],
         "Would love a {phone} home screen widget [for|showing] {thing}[, I check it {n} times a day|, saves opening the app {n} times a day|; I look it up {n} times daily].",
         "[Checks {n} times a day, wants {phone} widget|{n} daily checks: {phone} widget for {thing}]"),
        ("A", ["low", "medium"],
         "Could {P} expose {field} on the {endpoint} resource? [We call it {n}k times a day|It would save us {n}k requests a day|We fetch it {n}k times daily].",
         "[{field} on {endpoint} would save {n}k calls|{n}k daily calls: expose {field} on {endpoint}]"),
        ("A", ["medium", "low"],
         "[We'd really like|Please add|Can we get] webhooks for {event2} [in {P}|events from {P}] [instead of polling every {mins} minutes|to replace our {mins}-minute polling].",
         "[{mins}-minute polling could become {event2} webhooks|Replace {mins}-min polling with {event2} webhooks]"),
        ("MW", ["low"],
         "[Can you add|Any chance of|Please consider] a dark [theme|mode] [for|in] {P}? I [use|check] it [around|at|after] {time} [every night|most nights|daily] and [my eyes hurt|it's blinding|the white is too bright].",
         "[At {time} daily, wants dark theme|{time} use: dark theme requested]"),
        ("TR", ["low", "medium"],
         "Suggestion: a vacation mode [on|for] {P} that {does}. [We're away from {date} to {date2}|Next trip is {date} to {date2}], for example.",
         "[Away from {date}, wants vacation mode that {does}|{date} trip: vacation mode that {does}]"),
        ("W", ["medium", "low"],
         "[Our team of|We're a team of|Our group of] {n} [and we need|and need|and would like] [role-based permissions|roles|permission levels] in {P} so [interns|contractors|guests] can't [change billing|delete devices|see invoices].",
         "[Team of {n} needs role-based permissions|{n}-person team wants permission levels]"),
        ("T", ["low"],
         "[It'd be great if|It would help if|I wish] {P} [used|could use|took] the [weather forecast for|outdoor temperature in|local weather in] {city} to [pre-heat|start heating early|warm up the house] [when it drops|once it falls|if it goes] below {temp}.",
         "[{city} forecast below {temp} should trigger pre-heat|{city} weather under {temp}: pre-heat idea]"),
        ("R", ["low", "medium"],
         "[Guest wifi|A guest network|Visitor wifi] with a [time limit|{hours}-hour limit|timer] would be [a nice|a welcome|a great|a useful] [addition to|feature for|upgrade for] {P}. [We have|We get|There are] about {n} guests a month.",
         "[{n} guests a month: wants time-limited guest wifi|{n} monthly guests, wants timed guest wifi]"),
        ("S", ["low", "medium"],
         "[Please let us|Can we|We'd like to] pause {P} for {count} months [from|starting|beginning] {date} [instead of cancelling|over the summer|while we're abroad].",
         "[From {date}, pause for {count} months|{date} start of a {count}-month pause]"),
        ("S", ["low"],
         "[A household|A family|A multi-person] discount [on|for] {P} would [make sense|be fair|be great] [for a home of|for|with] {count} people [and|with|using] {n} devices[ like ours|].",
         "[{n}-device home of {count} wants discount|{n} devices, {count} people: household discount]"),
        ("MW", ["low"],
         "Could you add {lang} as a language in {P}? [My {relative} {name2} doesn't read English|{name2} on our team only reads {lang}|It's for {name2}, who reads no English].",
         "[{name2} needs {lang} language option in {p}|For {name2}: {lang} language in {p}]"),
        ("MW", ["medium", "low"],
         "[Please bring back|Can we get back|Restore] the {old} [view|layout|mode] in {P}[;|.|,] the [redesign|update|new design] on {date} [hides too much|needs extra clicks|broke my workflow].",
         "[Since the {date} redesign, wants {old} view|{old} view removed on {date}, restore]"),
        ("MWTR", ["low"],
         "{n} [people|households|users] in our [building|street|co-op] use {P}, and we'd all like {feature}.",
         "[{n} users in building want {feature}|Group of {n} users requests {feature}]"),
    ],
    "how_to": [
        ("TM", ["low", "medium"],
         "How do I set [a weekly schedule|different temperatures for {weekday}|a night setback] on {P}? [We get up at {time}|I leave at {time}|Work starts at {time}] [on weekdays|most days].",
         "[{time} wake-up schedule setup question|Scheduling around {time} on {p}]"),
        ("W", ["low", "medium"],
         "[What's|Which is|Tell me] the [best|easiest|fastest] way to [export|download|get out] [all my data|{month}'s readings|the last {days} days] from {P}? [We need it for an audit on {date}|Our accountant wants it by {date}|I'm leaving on {date}].",
         "[By {date}: how to export data|Before {date}, wants a data export]"),
        ("RT", ["medium", "low"],
         "[How can I|How do I|What's the way to] [reset|wipe|restore] {P} [to factory settings|to defaults|back to factory state] [before I sell it|after moving to {city}|because I forgot the password]? [It's on firmware {fw}|The unit is on firmware {fw}|Firmware is {fw}].",
         "[Firmware {fw}: how to factory reset|{fw} unit needs factory reset steps]"),
        ("AW", ["low"],
         "Where do I find [my|our] API key [in|on] {P}? [The {screen} page doesn't show it|The docs mention a {screen} tab|I looked everywhere]. I'm logged in as {email}.",
         "[{email} can't find API key|{email} asks where API key is]"),
        ("TR", ["low", "medium"],
         "How do I connect {P} to {assistant}? [I've been trying since {date}|I tried again on {date}|Tried {count} times since {date}].",
         "[Since {date} trying to connect to {assistant}|{date}: asks how to link with {assistant}]"),
        ("MWS", ["low"],
         "Can I use {P} with {n} [homes|devices|users] on one account? [If so, how|What's the limit|Is there an extra fee]?",
         "[{n} devices on one {p} account?|Limit question: {n} devices, one account]"),
        ("R", ["low", "medium"],
         "[How do I change|How can I reset|Where do I set] the [wifi|wireless|WLAN] password [on|for] {P}? [{name2} set it up|My {relative} {name2} set it up|It was set up by {name2}] in {year} and [left|moved out|isn't around].",
         "[{name2}'s old wifi password, how to change|{name2} set up router, password change help]"),
        ("RT", ["low", "medium"],
         "What does a {colour} light on {P} mean? [It started on {date}|It's been like that since {date}|First noticed it {date}].",
         "[Since {date} {colour} light, asks meaning|{date}: what {colour} light means]"),
        ("A", ["low", "medium"],
         "[How do I|Can we|What's the way to] [authenticate|sign requests|log in] with OAuth [instead of|rather than] [a key|an API key|static keys] [on|for|with] {P}? [We use {lang2}|Our stack is {lang2}|A {lang2} sample would help], and our app id is {appid}.",
         "[App {appid}: OAuth instead of API key|{appid} needs OAuth setup help]"),
        ("TR", ["low", "medium"],
         "[Can you walk me through|How do I do the|Please explain] pairing [of|for|] {P} [with the app|with your app|to the Lumio app] on my {phone}? [It fails at step {count}|It stops at {pct}%|The code {code} isn't accepted].",
         "[{phone} pairing with {p} help|{phone}: walkthrough for pairing {p}]"),
        ("WAS", ["low"],
         "Where can I see my usage history for {month} {year} in {P}?",
         "[{month} {year} usage history location|Usage for {month} {year}: where to find]"),
        ("MT", ["low"],
         "How do I share [access to|control of] {P} with my {relative} {name2}[ ({email2})|]?",
         "[{name2} to get shared access to {p}|{name2} should get access to {p}]"),
        ("A", ["low"],
         "Is there a {lang2} example for calling {endpoint} on {P}? [We're on version {appver} of your SDK|Our SDK is {appver}].",
         "[SDK {appver}: {lang2} example for {endpoint}|{lang2} sample for {endpoint} on SDK {appver}]"),
        ("R", ["low"],
         "[How do I set up|How can I create|Where do I enable] [a guest|a visitor|a separate guest] [network|wifi] [on|for|with] {P} for [our {room}|visitors|an Airbnb guest]? We have {n} [guests|visitors] a month.",
         "[{n} guests a month, guest network setup|Guest network for {n} monthly visitors]"),
        ("TM", ["low"],
         "[How do I switch|How can I change|Where do I set] {P} [from Celsius to Fahrenheit|from °F to °C]? It shows {temp} [right now|at the moment].",
         "[Shows {temp}, wants other temperature unit|{temp} shown, wants to switch temperature units]"),
        ("MW", ["low"],
         "[How do I change|How can I switch|Where do I set] the [language|display language|UI language] [of|in] {P} to {lang}? [My {relative} {name2} uses it too|It's for {name2}|{name2} needs it].",
         "[{name2}: {lang} interface needed in {p}|{name2} needs {p} in {lang}]"),
        ("A", ["low", "medium"],
         "[What's|What is|Where can I see] the [rate limit|request quota|throttle limit] [on|for] {P}, and [how do we|can we|who do I ask to] [request|get] more than {n} calls a minute [for {project}|for our {city} office|in production]?",
         "[Above {n} calls a minute: rate limit increase|{n} calls per minute limit increase]"),
        ("TR", ["low", "medium"],
         "How do I update {P} to firmware {fw} manually? [Auto-update seems off|It's stuck on {fw2}|The app says {fw2} is latest].",
         "[Firmware {fw} manual install steps|{fw} firmware: manual update help]"),
    ],
    "cancellation": [
        ("S", ["low", "medium"],
         "[Please cancel|Kindly cancel|I'd like to cancel] {P} [at the end of the current billing period|when my term ends on {date}|at period end ({date})|once {month} is over] [for|on] [account|login|] {email}.",
         "[{email} cancels at period end|{email}: cancel at end of term]"),
        ("S", ["medium", "low"],
         "[I want to|I'd like to|We need to] cancel [my|our|the] {plan} [subscription|plan|membership][;|:|,] at {amount} a month it's [too expensive for us now|more than we use|not worth it anymore].",
         "[{amount} a month too expensive, cancel {plan}|At {amount} monthly, cancelling {plan} plan]"),
        ("S", ["medium", "high"],
         "[How do I|How can I|Where do I] cancel {P}? [There's no|I can't find a|I see no] [cancel option|button|way to end it] [anywhere in the app|on the {screen} page|in my profile|on the website]. [I've looked since|Been searching since|Tried since] {date}.",
         "[Since {date} can't find cancel option|{date} onward: no way to cancel found]"),
        ("TR", ["high", "medium"],
         "Please cancel order {order} for {P} [before it ships|right away|today], I ordered it [by mistake|twice|for the wrong address].",
         "[Order {order} to be cancelled before shipping|Cancel {order} before it ships]"),
        ("SA", ["medium", "low"],
         "We're moving to another provider; please close [our|the] {p} account effective {date}[ ({email})|].",
         "[Effective {date}, close {p} account|{date}: close {p} account, switching provider]"),
        ("S", ["low"],
         "[Instead of cancelling|Rather than cancel|Before I cancel], [can I|could I|is it possible to] downgrade from {plan} to {plan2} [from {date}|at renewal on {date}|starting {date}]?",
         "[From {date} downgrade {plan} to {plan2}|{date}: downgrade from {plan} to {plan2}]"),
        ("S", ["medium", "high"],
         "Cancel [my membership|{P}|my plan] and refund the {date} payment of {amount}[, I haven't used it since|, the thermostat went back to the shop|].",
         "[{amount} payment of {date} to be refunded, cancel|Refund {amount} from {date} and cancel]"),
        ("S", ["high", "medium"],
         "I've tried to cancel {P} {count} times since {date} and it [keeps renewing|renewed again|charged me {amount} anyway].",
         "[Since {date}, {count} failed cancellations|{count} tries since {date}, still renewing]"),
        ("S", ["low", "medium"],
         "Please [turn off|stop|disable] auto-renewal on {P} for [account|] {email} before {date}.",
         "[{email} auto-renewal off before {date}|{email}: stop auto-renewal by {date}]"),
        ("S", ["low", "medium"],
         "I'm moving [abroad|to {country}] on {date}, so I need to end {P}.",
         "[Moving on {date}, wants to end {p}|{date} move abroad, cancel {p}]"),
        ("TR", ["medium", "low"],
         "[I'd like to|I want to|Please let me] return {P} (order {order}) [within the 30-day window|under your 30-day policy|before day 30] and cancel the service [too|as well|with it].",
         "[Order {order} return and service cancellation|Return {order} within 30 days, cancel]"),
        ("S", ["medium", "low"],
         "Our trial ends on {date}; make sure we're not [converted|moved|switched] to a paid {plan} plan [automatically|afterwards].",
         "[Trial ending {date}, no paid {plan} conversion|{date} trial end without paid {plan}]"),
        ("S", ["medium"],
         "My {relative} passed away in {month}. [How do I|How can I|What do I need to] cancel [their|the] [Lumio subscription|{plan} plan|Lumio membership] [in their name|on {email}]?",
         "[{month} bereavement: cancel {relative}'s {p}|From {month}: cancel deceased {relative}'s {p}]"),
        ("A", ["low", "medium"],
         "[Please cancel|Kindly cancel|Cancel] the API [plan|subscription|tier] for [project|our project|app] '{project}'[,|;|.] [we shut it down|we ended it|it was retired] on {date}.",
         "[Ended {date}: cancel API plan for {project}|{date} shutdown of {project}: cancel plan]"),
        ("S", ["medium", "high"],
         "Cancel everything on {email}. [I'm done with Lumio|{count} outages in {month} was enough|We're switching providers].",
         "[{email} wants to cancel all services|{email}: cancel everything on the account]"),
        ("S", ["low"],
         "[Is there a fee|What's the fee|Would I pay a penalty] if I [end|terminate|leave] my {plan} [contract|plan|subscription] {count} months early, on {date}?",
         "[{date}: fee for ending {plan} early?|On {date} ending {plan} early, fee question]"),
    ],
    "security": [
        ("MW", ["high", "urgent"],
         "[I got an email|Your system emailed me|An alert said|I was notified] [that someone|that somebody|a person] [signed in to|logged into|accessed] my {p} account from {city} {when}. [It wasn't me|That wasn't me|I was asleep then|I've never been to {city}].",
         "[{when} sign-in from {city}, not the customer|{when}: unrecognised sign-in from {city}]"),
        ("MW", ["high", "medium"],
         "[There's|I see|My account shows] a [login|sign-in|session] from [an unknown device|a device I don't own|a strange device] ({device}) [in|on] my {p} [activity log|login history|security page|sessions list] on {date}.",
         "[{date} login from unknown device {device}|Unknown {device} login on {date}]"),
        ("A", ["urgent", "high"],
         "[Our|The] [key|API key|token] for {P} [was exposed|leaked|got published] in a public [GitHub repo|Gist|pastebin|Slack channel] on {date}[;|.|, so] [please revoke it|revoke it please|kill it now] and [check for misuse|audit its usage|look for abuse].",
         "[API key leaked {date}, revoke and audit|{date} key leak: revoke and check misuse]"),
        ("MWS", ["medium", "low"],
         "[I think I|I believe I|Looks like I|Pretty sure I] got a phishing [email|mail|message] [pretending to be|posing as|claiming to be] Lumio[,|] [asking me|telling me|wanting me] to [confirm|re-enter|verify] [my {p} password|my {p} login|the {p} password] [at|on|via] {domain} on {date}.",
         "[{date}: phishing via {domain} imitating Lumio|On {date} phishing email from {domain}]"),
        ("R", ["high", "medium"],
         "[The admin page of|The web admin for|The login page of] {P} is [reachable|open|exposed] [from the internet|publicly|to the outside] on port {port} [with|using|still with] [the default password|factory credentials|admin/admin][; our IP is {ip}|, public IP {ip}|. IP: {ip}].",
         "[{ip}: router admin on port {port} exposed|{ip} port {port} exposes admin page]"),
        ("T", ["high", "urgent"],
         "Someone changed {P} to {temp} at {time} [on {date}|last night|yesterday] [and nobody at home did it|and it wasn't anyone here|but none of us touched it].",
         "[{temp} set at {time} by unknown person|At {time} someone set {temp} remotely]"),
        ("W", ["high", "medium"],
         "[I found|I've found|We discovered] [an XSS|a stored XSS|a reflected XSS] [issue|bug|flaw] in the {screen} search [field|box] of {P}[ and|;|.] [I want to report it responsibly|I can send a proof of concept|details on request]. [My handle is|Reporter:|I'm] {username}.",
         "[{username} reports XSS in {screen} search|{username}: XSS found in {screen} search]"),
        ("MW", ["urgent", "high"],
         "My {p} [password|login password] [was changed|got changed|has been reset] [without me|by someone else|without my knowledge] [and|, and|;] the recovery [email|address] [now points to|is now|was switched to] {email2} {since}.",
         "[{email2} set as recovery email by attacker|{email2} now recovery address, password changed]"),
        ("T", ["low", "medium"],
         "[Is|Are] the [data|readings|messages] {P} sends [encrypted|protected|secured] in transit? [We're installing|We plan to fit|I'm about to mount] {n} units [in the {room}|across our {city} flats|next {weekday}].",
         "[{n} units: is {p} traffic encrypted|{n}-unit install: asks about encryption in transit]"),
        ("R", ["high", "medium"],
         "{count} [unknown|strange|unfamiliar] devices [keep appearing|keep showing up|are listed] [on|in] {P}[,|] [even after|despite|although] I changed the [wifi|network|WLAN] password on {date}.",
         "[After {date} reset, {count} strangers on network|Since {date} password change, {count} unknown devices]"),
        ("A", ["urgent", "high"],
         "[We see|Our logs show|There are] [requests|calls|API calls] to {P} from {ip} [using|with|signed with] our key[, and|;|, but] that [IP|address] [isn't ours|is not ours|is unknown to us].",
         "[{ip} using our API key, not ours|{ip}: unknown requests with our API key]"),
        ("MW", ["high", "medium"],
         "The reset-password link [from {P}|for {P}|that {P} sent] [still works|can be reused|keeps working] after I [used it|clicked it|reset my password] on {date}.",
         "[{date} reset link still works after use|{date} password reset link still reusable]"),
        ("S", ["urgent", "high"],
         "My card ending {last4} was used for {count} [purchases|orders|charges] [in your store|on {P}|through {P}] that I [didn't make|never made|did not authorise][ on {date}| this week|].",
         "[Card {last4}: {count} fraudulent purchases|Card ending {last4} used for {count} unauthorised purchases]"),
        ("MW", ["high", "medium"],
         "An address I don't know, {email2}, was added to my {p} notifications [on {date}|last week|{since}].",
         "[{email2} added to notifications without consent|Unknown {email2} on notification list]"),
        ("R", ["medium", "high"],
         "{P} on firmware {fw} [still has|is still exposed to|remains open to] the [vulnerability|CVE|issue] from your {month} [advisory|security notice|bulletin]. [When is a patch|When will a fix be|Is a patch] [coming|due|out|planned]?",
         "[Firmware {fw} still vulnerable per {month} advisory|{fw} unpatched since {month} advisory]"),
        ("MW", ["urgent", "high"],
         "I [accidentally|stupidly] posted my {p} login in a public forum [on {date}|at {time}|{since}]. Please lock {email} until I reset it.",
         "[{email} login leaked publicly, lock account|Lock {email}, credentials posted publicly]"),
    ],
}

# Cues: the priority and the tone a reader would go by.
PRIORITY_CUES = {
    "urgent": [
        "[Our whole|The entire|Our] [office|team|company|shop|clinic] is [offline|down|unable to work|at a standstill] [right now|since {time}|as we speak].",
        "[Full outage|Total outage|An outage] for [all {n} of our|our {n}] [users|staff|customers|tenants|employees].",
        "[URGENT|Urgent!!|Critical|P1]: [production is down|nothing works for anyone|we are completely stuck|{n} people can't work].",
        "[We're losing|We lose|Losing] [money|orders|customers|bookings] every [minute|hour] [like this|it's down].",
        "[Please escalate|Escalate this|Get someone on this] [immediately|right away|to on-call|now].",
        "All {n} of our [sites|locations|rental units|stores] are [affected|down|hit] [right now|since {time}|this {weekday}].",
        "[This is an emergency|Emergency|It's an emergency], [please call me|call me back|ring me] on {phonenum}.",
    ],
    "high": [
        "I [need|really need|have to have] this [fixed|sorted|resolved] [today|by tonight|before {weekday}|before {time}].",
        "[Can't|Cannot|Unable to] use it [at all|whatsoever] [right now|since {date}|since {time}].",
        "This is [blocking|stopping] [me|my work|our team|my whole day] [completely|right now|since {time}].",
        "[Please|Could you please|Kindly] [look at|handle|deal with] this [asap|as soon as possible|quickly|today].",
        "{days} days [now|already|so far], [still stuck|still broken|no fix yet].",
        "[Important|It matters] [to us|for my work|for my family]: [we rely on it|it's our main tool|I need it working].",
    ],
    "medium": [
        "[Annoying|A nuisance|Irritating], but [I can|we can|I'll] work around it [for now|for a while|until {weekday}].",
        "[Not urgent|No emergency|Not critical], [but|though] [ideally|hopefully] [sorted|fixed|answered] [this week|in a few days|before {weekday}|by {date}].",
        "[It's happened|This has happened|I've seen this] {count} times [now|this month|since {date}|this week].",
        "[A reply|An answer|Some help] [in the next few days|this week|before {weekday}] would be [great|appreciated|nice].",
        "[Could you|Can someone|Would someone] take a look [when you can|this week|before {weekday}|in the coming days]?",
    ],
    "low": [
        "[No rush|No hurry|Zero rush] at all[.|, whenever suits.|, take your time.|, really.]",
        "[Just curious|Just wondering|Only asking], [no urgency|not important|nothing urgent|it can wait].",
        "[Would be nice|Nice] to [know|have it|sort out] [eventually|one day|sometime].",
        "[Low priority|Not a big deal|Minor thing], just [wanted to flag it|thought I'd mention it|FYI|letting you know].",
        "[Whenever you have a moment|Whenever you get a chance|When you have time] is [fine|perfect|okay].",
    ],
}
TONES = {
    "negative": [
        "[This is|Honestly this is|Frankly this is] [really|incredibly|so|very] [frustrating|annoying|disappointing|poor].",
        "[I'm|I am|We're] [fed up|sick of this|losing patience|running out of patience] [with Lumio|with this|to be honest|by now].",
        "[Very|Extremely|Really|Deeply] disappointed [with the {p}|in your service|right now|in Lumio].",
        "This is [unacceptable|ridiculous|not okay|a joke] [for a paid product|for what we pay|tbh|in {year}].",
        "[Third|Fourth|Second|Fifth] time I'm [writing|contacting you|asking] about this[!!|!|.| 😡]",
        "[I'm about to|I will|We'll] [switch to a competitor|leave a one-star review|return everything|cancel] [soon|by {weekday}|otherwise].",
        "[Worst|Terrible|Awful] [support experience|customer service|product experience] [in years|in ages|this year][.|!| 🙄]",
    ],
    "positive": [
        "[Love|Really love|Loving] [the product|the {p}|your stuff] [otherwise|apart from this|in general][!|.| 🙂]",
        "You [guys|folks|all] have been [great|brilliant|super helpful|fantastic] [so far|every time|as always].",
        "[Thanks a lot|Many thanks|Thanks so much], [really appreciate it|you're the best|great support as always][!| 🙏| 👍]",
        "[Big fan|Huge fan] of [the {p}|Lumio] [by the way|btw|since day one|since {year}].",
        "[Keep up the good work|Great job on the last update|The new design looks fantastic|Setup was a breeze]!",
        "[Happy|Very happy|Delighted] with [Lumio|the {p}|everything] so far[!|.| 😊]",
    ],
    "neutral": [
        "Thanks.", "Thank you in advance.", "Let me know.", "Please advise.", "Any info appreciated.",
        "Thank you.", "Regards.",
    ],
}
CONTEXT = {
    "bug": ["I already [restarted|rebooted|power-cycled] it [twice|three times|a couple of times|{count} times].",
            "[Reinstalling|Logging out and back in|Clearing the cache] [didn't help|changed nothing|made no difference].",
            "It started [after the last update|on {date}|about {days} days ago|{since}].",
            "[Screenshot|Screen recording|A log file] attached[.| ({n} KB).]",
            "[My {relative}|A colleague|{name2}] [sees|gets|has] the same [thing|issue|problem]."],
    "billing": ["My account email is {email}.", "[The|My] card ends in {last4}.",
                "[I've|We've] been [a customer|customers] since {year}.",
                "[Bank statement|Receipt|Screenshot of the charge] attached."],
    "account": ["My account email is {email}.", "I'm [on|using] {browser}.",
                "[I've|We've] had the account since {year}."],
    "shipping": ["[The|My] order was placed on {date2}.", "I [live|am based] in {city}.",
                 "I need it [by|before] {date2}."],
    "feature_request": ["[We|I] use it [every day|daily|a lot] [at home|in our office|for {n} rental flats].",
                        "[Otherwise|Apart from that] it does [everything|what] we need."],
    "how_to": ["[Checked|Searched|Read] the [help centre|FAQ|manual], [no luck|nothing there|still unclear].",
               "[New to Lumio|Not very technical|Beginner here], [sorry|apologies] if [obvious|this is basic]."],
    "cancellation": ["[I've|We've] been [a customer|customers] since {year}.",
                     "My account email is {email}."],
    "security": ["[I've|I have] already changed my password.", "My account email is {email}.",
                 "It happened around {time} on {date2}."],
}
GREETINGS = ["Hi,", "Hello,", "Hi there,", "Hey,", "Hello Lumio team,", "Dear Lumio support,",
             "Good morning,", "Good afternoon,", "Hi support,", "Hallo,", "Bonjour,", "Hi {agent},",
             "To whom it may concern,", "Hey folks,", "Hi all,", "Dear Sir or Madam,"]
SIGNOFFS = ["Thanks, {name}", "Thank you,\n{name}", "Regards, {name} {last}", "Best, {name}",
            "Cheers, {name}", "— {name}", "{name} ({email})", "Sent from my {phone}",
            "Kind regards,\n{name} {last}", "Many thanks", "Thx", "Merci, {name}", "Danke, {name}",
            "{name} {last}, {company}"]

# Slot values.
FIRST = ["Anna", "Ben", "Chloé", "David", "Elif", "Farid", "Grace", "Hiro", "Inés", "Jonas",
         "Kemi", "Liam", "Maëlle", "Noah", "Olga", "Pedro", "Quentin", "Rosa", "Sven", "Tariq",
         "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoë", "Aisha", "Björn", "Carla", "Dmitri",
         "Emma", "Felix", "Giulia", "Hannah", "Ivan", "Jürgen", "Katya", "Lucas", "Mina", "Nils",
         "Oscar", "Priya", "Rafael", "Sofia", "Tom", "Valentina", "Will", "Yara", "Amir", "Bea",
         "Conor", "Dana", "Esther", "Fatima", "Gabriel", "Helga", "Isaac", "Jade", "Kai", "Lena",
         "Marco", "Nadia", "Omar", "Paula", "Ruth", "Sami", "Theo", "Ursula", "Vera", "José"]
LAST = ["Müller", "O'Brien", "García", "Nguyen", "Kowalski", "Okafor", "Lindqvist", "Dubois",
        "Rossi", "Patel", "Tanaka", "Smith", "Johansson", "Novák", "Fernández", "Schäfer",
        "Murphy", "Ahmed", "Kim", "Silva", "Brown", "Horváth", "Jensen", "Costa", "Moreau",
        "Weber", "Ivanova", "Haddad", "Walsh", "Yilmaz", "Bauer", "Lopez", "Andersen", "Singh"]
ASCII_FIRST = ["anna", "ben", "chloe", "david", "elif", "farid", "grace", "hiro", "ines", "jonas",
               "kemi", "liam", "mina", "noah", "olga", "pedro", "rosa", "sven", "tariq", "uma",
               "victor", "wen", "yusuf", "zoe", "aisha", "bjorn", "carla", "emma", "felix", "ivan"]
ASCII_LAST = ["muller", "obrien", "garcia", "nguyen", "kowalski", "okafor", "dubois", "rossi",
              "patel", "tanaka", "smith", "novak", "murphy", "ahmed", "kim", "silva", "weber"]
AGENTS = ["Sam", "Priya", "Marco", "Lea", "Tobias", "Nina", "Ravi", "Clara"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PHONES = ["iPhone 12", "iPhone 13 mini", "iPhone 15 Pro", "iPhone SE", "Pixel 7", "Pixel 8a",
          "Galaxy S21", "Galaxy A54", "OnePlus 11", "Redmi Note 12", "Moto G84", "iPad Air",
          "Fairphone 5", "Galaxy Z Flip"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge", "Brave", "Opera", "Chrome on a Chromebook",
            "Firefox on Linux"]
CITIES = ["Lyon", "Munich", "Leeds", "Austin", "Toronto", "Porto", "Kraków", "Zürich", "Malmö",
          "Denver", "Dublin", "Rotterdam", "Seville", "Graz", "Osaka", "Melbourne", "Cork",
          "Ghent", "Turin", "Bergen", "São Paulo", "Montréal", "Brno", "Tampere", "Bristol",
          "Phoenix", "Calgary", "Utrecht", "Bilbao", "Köln", "Aarhus", "Lisbon", "Nantes"]
COUNTRIES = ["Canada", "Germany", "Norway", "Switzerland", "Ireland", "Australia", "Japan",
             "Mexico", "Portugal", "Poland", "Spain", "Austria", "New Zealand", "Finland"]
ROOMS = ["living room", "hallway", "bedroom", "kitchen", "basement", "office", "kids' room",
         "upstairs landing", "guest room", "garage"]
PLANS = ["Plus", "Family", "Pro", "Business", "Starter", "Premium"]
CARRIERS = ["UPS", "DHL", "FedEx", "DPD", "Royal Mail", "USPS", "GLS", "Canada Post", "PostNL"]
SCREENS = ["Settings", "Energy", "Schedule", "History", "Devices", "Billing", "Home",
           "Notifications", "Profile", "Reports", "Rooms", "Automations"]
CHARTS = ["energy usage", "temperature history", "bandwidth", "device uptime", "API usage",
          "humidity"]
ENDPOINTS = ["/v2/devices", "/v2/schedules", "/v2/readings", "/v2/zones", "/v2/users",
             "/v2/events", "/v2/webhooks", "/v2/homes", "/v2/alerts", "/v2/firmware"]
HTTP = ["500 Internal Server Error", "502 Bad Gateway", "400 Bad Request", "422", "504", "503",
        "409 Conflict"]
EVENTS = ["device.offline", "schedule.updated", "reading.created", "alarm.triggered",
          "user.invited", "firmware.updated", "zone.changed"]
RELATIVES = ["wife", "husband", "partner", "son", "daughter", "mum", "dad", "flatmate",
             "sister", "brother", "landlord", "grandmother"]
IDPS = ["Okta", "Azure AD", "Google Workspace", "OneLogin", "JumpCloud", "Keycloak"]
COLOURS = ["red", "orange", "amber", "blinking white", "purple", "flashing blue", "solid yellow"]
LANGS = ["Polish", "Portuguese", "Dutch", "Turkish", "Japanese", "Czech", "Greek", "Swedish",
         "Catalan", "Ukrainian", "Hungarian"]
LANGS2 = ["Python", "Node.js", "Go", "PHP", "Java", "C#", "Ruby", "Rust"]
ASSISTANTS = ["Alexa", "Google Home", "Apple HomeKit", "Home Assistant", "SmartThings"]
INTEGRATIONS = ["IFTTT", "Home Assistant", "Zapier", "Matter", "SmartThings", "Apple HomeKit",
                "Slack", "Microsoft Teams", "Node-RED"]
COMPANIES = ["Brightwater Dental", "Kessler & Sohn GmbH", "Pine Hollow Café", "Northwind Ltd",
             "Atelier Moreau", "Bluefin Logistics", "Casa Verde SL", "Oakridge Property",
             "Nordlys AS", "Harbour Yoga", "Tandem Studio", "Maple & Co"]
PROJECTS = ["greenhouse-monitor", "hvac-sync", "ops-dashboard", "tenant-portal", "heat-map",
            "building-7", "pilot-eu", "energy-report", "smart-office", "retrofit-2024"]
LINES = ["Device protection", "Cloud history add-on", "Usage tier 2", "Priority support",
         "Extra seats", "Installation fee", "Data retention+"]
OLD_VIEWS = ["classic", "list", "compact", "calendar", "floor plan", "timeline"]
FIELDS = ["battery_level", "last_seen", "firmware_version", "humidity", "signal_strength",
          "owner_email", "room_name"]
THINGS = ["the current temperature", "today's energy use", "who is home", "router status",
          "the next schedule change", "humidity"]
DOES = ["lowers the heating", "turns off guest wifi", "sends a daily report",
        "pauses all schedules", "alerts me on frost"]
WRONG = ["a {other} instead", "the {tmodel} instead of the {tmodel2}",
         "someone else's order for {name2} {last}", "only the power cable",
         "an empty box with a packing slip"]
PARTS = {"smart thermostat": ["wall plate", "display", "mounting bracket", "power adapter",
                              "screws", "wiring labels"],
         "router": ["power adapter", "antenna", "Ethernet cable", "satellite unit", "wall mount",
                    "quick start card"]}
FEATURES = {
    "mobile app": ["a widget for the lock screen", "offline mode", "a tablet layout",
                   "Face ID login", "shortcuts for scenes"],
    "web dashboard": ["a printable monthly report", "bulk editing of devices", "saved filters",
                      "a map of all our sites", "keyboard shortcuts"],
    "smart thermostat": ["a child lock", "per-room humidity targets", "a holiday calendar",
                         "a night dimming mode", "energy price based schedules"],
    "router": ["per-device bandwidth limits", "a parental schedule", "WPA3 for the guest network",
               "a traffic graph per device", "VPN server support"],
    "api": ["bulk endpoints", "a sandbox environment", "GraphQL support", "idempotency keys",
            "server-sent events"],
    "subscription": ["a quarterly plan", "gift cards", "a student tier", "a pause button",
                     "invoices in my language"],
}
ACTIONS = ["mute alerts at night", "rename rooms in bulk", "set a default home",
           "export schedules as PDF", "hide offline devices", "pin favourite devices",
           "limit bandwidth per device", "share a read-only view", "group devices by floor"]


class Ctx(dict):
    """Slot values for one ticket, drawn on first use so that a template pays only for its slots."""

    def __init__(self, rng: random.Random, product: str):
        super().__init__()
        self.rng, self.product = rng, product

    def __missing__(self, key):
        value = self._draw(key)
        self[key] = value
        return value

    def _draw(self, key):  # noqa: C901 (one flat table of slot makers)
        r = self.rng
        if key == "P":
            return r.choice(P_PHRASES[self.product])
        if key == "p":
            return P_SHORT[self.product]
        if key in ("name", "name2"):
            other = self.get("name" if key == "name2" else "name2")
            return r.choice([f for f in FIRST if f != other])
        if key in ("last", "last2"):
            return r.choice(LAST)
        if key in ("email", "email2"):
            sep = r.choice([".", "_", ""])
            return (f"{r.choice(ASCII_FIRST)}{sep}{r.choice(ASCII_LAST)}"
                    f"{r.choice(['', str(r.randint(1, 99))])}@{self['maildomain']}")
        if key == "maildomain":
            return r.choice(["example.com", "example.org", "example.net", "mail.example",
                             "post.example", "inbox.test", "home.example", "corp.test",
                             "webmail.example", "family.example", "studio.test", "office.example"])
        if key == "domain":
            return r.choice(["lumio-support.example", "lumio-billing.example", "lum1o.example"])
        if key == "agent":
            return r.choice(AGENTS)
        if key in ("order",):
            return r.choice([f"#{r.randint(100000, 999999)}", f"LM-{r.randint(10000, 99999)}",
                             f"{r.randint(10, 99)}-{r.randint(1000, 9999)}-{r.randint(10, 99)}"])
        if key == "invoice":
            return f"INV-{r.randint(2021, 2024)}-{r.randint(100, 99999):05d}"
        if key == "cur":
            return r.choices(["$", "€", "£"], weights=[6, 3, 2])[0]
        if key in ("amount", "amount2"):
            base = r.choice([4.99, 7.5, 9.99, 12.5, 14.99, 19.99, 24, 29, 39.9, 49.99, 59, 79,
                             99, 119.95, 129, 149.99, 199, 249])
            value = base + r.choice([0, 0, 0, 1, 2, 5, 10, 20])
            cur = self["cur"]
            if cur == "€" and r.random() < 0.5:
                return f"{value:.2f} €".replace(".", ",")
            return f"{cur}{value:.2f}" if value % 1 else f"{cur}{value:.0f}"
        if key in ("date", "date2"):
            month, day = r.choice(MONTHS), r.randint(1, 28)
            style = r.randrange(5)
            if style == 0:
                return f"{month} {day}"
            if style == 1:
                return f"{day} {month}"
            if style == 2:
                return f"{MONTHS.index(month) + 1}/{day}"
            if style == 3:
                return f"{month[:3]} {day}"
            return f"{day:02d}.{MONTHS.index(month) + 1:02d}.{r.randint(2023, 2024)}"
        if key == "month":
            return r.choice(MONTHS)
        if key == "weekday":
            return r.choice(WEEKDAYS)
        if key == "year":
            return str(r.randint(2015, 2023))
        if key == "last4":
            return f"{r.randint(0, 9999):04d}"
        if key == "phone":
            return r.choice(PHONES)
        if key == "os":
            phone = self["phone"]
            if phone.startswith(("iPhone", "iPad")):
                return f"iOS {r.randint(15, 17)}.{r.randint(0, 6)}"
            return f"Android {r.randint(11, 14)}"
        if key == "appver":
            return f"{r.randint(3, 6)}.{r.randint(0, 19)}.{r.randint(0, 9)}"
        if key in ("fw", "fw2"):
            return f"{r.randint(1, 9)}.{r.randint(0, 40)}.{r.randint(0, 30)}"
        if key == "browser":
            return r.choice(BROWSERS)
        if key == "err":
            return r.choice([f"E-{r.randint(100, 999)}", f"ERR_{r.choice(['AUTH', 'SYNC', 'PAY', 'NET'])}_{r.randint(1, 99)}",
                             f"0x{r.randint(4096, 65535):04X}", f"code {r.randint(1000, 9999)}"])
        if key == "http":
            return r.choice(HTTP)
        if key == "endpoint":
            return r.choice(ENDPOINTS)
        if key == "n":
            return str(r.choice([r.randint(3, 30), r.randint(31, 250)]))
        if key == "m":
            return str(max(1, int(self["n"]) // r.randint(2, 5)))
        if key in ("days", "weeks", "count"):
            return str(r.randint(2, 9) if key != "count" else r.randint(2, 5))
        if key in ("mins",):
            return str(r.randint(3, 45))
        if key == "hours":
            return str(r.choice([2, 4, 6, 12, 24, 48]))
        if key == "time":
            h, m = r.randint(0, 23), r.randrange(0, 60, 5)
            return r.choice([f"{h:02d}:{m:02d}", f"{h % 12 or 12}:{m:02d}{'am' if h < 12 else 'pm'}",
                             f"{h % 12 or 12}{'am' if h < 12 else 'pm'}"])
        if key == "room":
            return r.choice(ROOMS)
        if key == "city":
            return r.choice(CITIES)
        if key == "country":
            return r.choice(COUNTRIES)
        if key in ("plan", "plan2"):
            other = self.get("plan" if key == "plan2" else "plan2")
            return r.choice([p for p in PLANS if p != other])
        if key in ("tmodel", "tmodel2"):
            other = self.get("tmodel" if key == "tmodel2" else "tmodel2")
            return r.choice([m for m in ["T2", "T3", "T3 Pro", "Mini", "T1 Classic"] if m != other])
        if key == "rmodel":
            return r.choice(["M1", "M2 Pro", "AX3000", "Mesh Duo", "AX1800"])
        if key == "carrier":
            return r.choice(CARRIERS)
        if key == "tracking":
            alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
            return r.choice(["1Z", "JD", "LX", ""]) + "".join(r.choice(alphabet) for _ in range(r.randint(10, 14)))
        if key == "temp":
            return r.choice([f"{r.randint(12, 30)}°C", f"{r.randint(55, 86)}°F", f"{r.randint(12, 30)} degrees"])
        if key == "screen":
            return r.choice(SCREENS)
        if key == "since":
            return r.choice(["since {date}", "since {date}", "since {time}", "since {time} on {weekday}"])
        if key == "when":
            return r.choice(["at {time}", "on {date}", "on {date}"])
        if key == "appid":
            return "app_" + "".join(r.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(6))
        if key == "colour":
            return r.choice(COLOURS)
        if key == "chart":
            return r.choice(CHARTS)
        if key == "deg":
            return str(r.randint(2, 6))
        if key == "octet":
            return str(r.choice([0, 1, 8, 50, 68, 178]))
        if key == "speed":
            return str(r.randint(20, 300))
        if key == "speed2":
            return str(r.randint(400, 940))
        if key == "part":
            return r.choice(PARTS[self.product])
        if key == "other":
            return "router" if self.product == "smart thermostat" else "thermostat"
        if key == "wrong":
            return r.choice(WRONG)
        if key == "relative":
            return r.choice(RELATIVES)
        if key == "username":
            return r.choice(["user", "lumio_", "guest", "home"]) + str(r.randint(1000, 99999))
        if key == "phonenum":
            return f"+{r.choice(['44 7', '49 15', '33 6', '1 415', '61 4'])}{r.randint(100, 999)} {r.randint(100000, 999999)}"
        if key == "idp":
            return r.choice(IDPS)
        if key == "ip":
            return f"{r.choice(['203.0.113', '198.51.100', '192.0.2'])}.{r.randint(2, 254)}"
        if key == "device":
            return r.choice(["a Windows PC", "an Android phone", "Linux, Firefox", "a Mac",
                             "an unknown iPad", "Chrome on Windows", "a Chromebook",
                             "Safari on macOS", "an Xbox", "a Galaxy Tab", "Opera on Windows",
                             "a {phone}"]) + r.choice(["", "", f" in {self['city']}"])
        if key in ("event", "event2"):
            return r.choice(EVENTS)
        if key == "feature":
            return r.choice(FEATURES[self.product])
        if key == "integration":
            return r.choice(INTEGRATIONS)
        if key == "assistant":
            return r.choice(ASSISTANTS)
        if key == "action":
            return r.choice(ACTIONS)
        if key == "thing":
            return r.choice(THINGS)
        if key == "field":
            return r.choice(FIELDS)
        if key == "does":
            return r.choice(DOES)
        if key == "old":
            return r.choice(OLD_VIEWS)
        if key == "lang":
            return r.choice(LANGS)
        if key == "lang2":
            return r.choice(LANGS2)
        if key == "company":
            return r.choice(COMPANIES)
        if key == "project":
            return r.choice(PROJECTS)
        if key == "line":
            return r.choice(LINES)
        if key == "promo":
            return r.choice(["SPRING", "WELCOME", "HOME", "SAVE", "BF"]) + str(r.randint(5, 40))
        if key == "code":
            return "".join(r.choice("ABCDEFGHKLMNPRSTUVWXYZ23456789") for _ in range(5))
        if key == "pct":
            return str(r.choice([10, 15, 20, 25, 30, 50]))
        if key == "port":
            return str(r.choice([80, 443, 8080, 8443, 7547, 8888]))
        raise KeyError(key)


ALT = re.compile(r"\[([^\[\]]*)\]")
SLOT = re.compile(r"\{(\w+)\}")


def fill(text: str, ctx: Ctx) -> str:
    """Resolve [a|b] choices, then {slot}s (slot values may contain more of both)."""
    for _ in range(4):
        text = ALT.sub(lambda m: ctx.rng.choice(m.group(1).split("|")), text)
        text = SLOT.sub(lambda m: ctx[m.group(1)], text)
        if "{" not in text and "[" not in text:
            return text
    raise ValueError(f"unresolved template: {text}")


def cap(text: str) -> str:
    if not text or re.search(r"[@_/]", text.split(" ", 1)[0]):  # addresses, ids stay as written
        return text
    return text[:1].upper() + text[1:]


def typo(rng: random.Random, text: str) -> str:
    """One human typo in a longer word: swapped, dropped or doubled letter."""
    words = [m for m in re.finditer(r"[A-Za-z]{5,}", text)]
    if not words:
        return text
    m = rng.choice(words)
    w, i = m.group(0), rng.randrange(1, len(m.group(0)) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        w = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    elif kind == 1:
        w = w[:i] + w[i + 1:]
    else:
        w = w[:i] + w[i] + w[i:]
    return text[:m.start()] + w + text[m.end():]


def choose_sentiment(rng: random.Random, category: str, priority: str) -> str:
    weights = {"urgent": [1, 7, 12], "high": [2, 8, 10], "medium": [4, 10, 6], "low": [8, 10, 2]}[priority]
    if category == "feature_request":
        weights = [weights[0] * 2, weights[1], weights[2]]
    return rng.choices(SENTIMENTS, weights=weights)[0]


def make_ticket(rng: random.Random, category: str | None = None) -> dict:
    """One natural ticket: the user's message, its labels and the pieces it was built from."""
    category = category or rng.choice(CATEGORIES)
    t_index = rng.randrange(len(TEMPLATES[category]))
    prods, pris, body, summary_t = TEMPLATES[category][t_index]
    product = CODE[rng.choice(prods)]
    ctx = Ctx(rng, product)
    with_cue = len(pris) > 1 and rng.random() < 0.85
    priority = rng.choice(pris) if with_cue else pris[0]
    sentiment = choose_sentiment(rng, category, priority)

    core = cap(fill(body, ctx))
    pieces = {"core": core}
    if with_cue or rng.random() < 0.3:
        pieces["cue"] = fill(rng.choice(PRIORITY_CUES[priority]), ctx)
    if sentiment != "neutral" or rng.random() < 0.4:
        pieces["tone"] = fill(rng.choice(TONES[sentiment]), ctx)
    if rng.random() < 0.45:
        pieces["context"] = fill(rng.choice(CONTEXT[category]), ctx)
    middle = ["cue", "tone", "context"]
    rng.shuffle(middle)
    order = ["core"] + middle
    if rng.random() < 0.25:  # some lead with the urgency or the mood
        order = [middle[0], "core"] + middle[1:]
    parts = [pieces[k] for k in order if k in pieces]
    sep = rng.choice([" ", " ", " ", "\n"])
    text = sep.join(parts)
    if rng.random() < 0.6:
        greeting = fill(rng.choice(GREETINGS), ctx)
        text = greeting + rng.choice([" ", "\n", "\n\n"]) + text
    if rng.random() < 0.5:
        text = text + rng.choice(["\n", "\n\n", " "]) + fill(rng.choice(SIGNOFFS), ctx)

    # The noise of real messages: phone keyboards, hurried typing.
    if rng.random() < 0.15:
        text = text.replace("'", "’")
    if rng.random() < 0.12:
        text = typo(rng, text)
        if rng.random() < 0.3:
            text = typo(rng, text)
    if rng.random() < 0.04:
        text = text.lower()
    if rng.random() < 0.04:
        text = text.replace("'", "").replace("’", "")
    if rng.random() < 0.03:
        text = text.rstrip(".") + "..."

    summary = cap(fill(summary_t, ctx))
    answer = {"category": category, "priority": priority, "product": product,
              "sentiment": sentiment, "summary": summary}
    return {"user": text, "answer": answer, "template": (category, t_index), "ctx": ctx}


def answer_json(answer: dict) -> str:
    return json.dumps({k: answer[k] for k in KEYS}, ensure_ascii=False)


def messages(user, answer) -> list:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer if isinstance(answer, str) or answer is None
             else answer_json(answer)}]


# --- similarity, as the dedup stage sees it (word 3-shingles of all turns) --------------------

def shingles(text: str, k: int = 3) -> set:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def conversation_text(msgs: list) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in msgs)


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


# --- injected defects ---------------------------------------------------------------------------

SYNONYMS = [("can't", "cannot"), ("please", "pls"), ("Please", "Pls"), (" and ", " & "),
            ("still", "yet"), ("again", "once more"), ("every", "each"), ("since", "from"),
            ("doesn't", "does not"), ("I'm", "I am"), ("It's", "It is"), ("my", "the"),
            ("twice", "two times"), ("want", "would like"), ("Hi", "Hello")]


def near_variant(rng: random.Random, text: str) -> tuple[str, str]:
    """The same message sent again, slightly different: (new text, what changed)."""
    for _ in range(20):
        kind = rng.choice(["word", "case", "space", "punct", "greeting", "typo", "signoff"])
        new = text
        if kind == "word":
            pairs = [(a, b) for a, b in SYNONYMS if a in text]
            if not pairs:
                continue
            a, b = rng.choice(pairs)
            new = text.replace(a, b, 1)
        elif kind == "case":
            new = rng.choice([text.lower(), text.upper(), text[:1].lower() + text[1:]])
        elif kind == "space":
            new = rng.choice([re.sub(r" ", "  ", text, count=3), "  " + text + " \n",
                              text.replace("\n", " "), re.sub(r"([.?!]) ", r"\1\n", text)])
        elif kind == "punct":
            new = rng.choice([text.replace(".", "!", 1), text.replace(",", "", 2),
                              text.rstrip(".!?") + "??", text.replace("?", " ?")])
        elif kind == "greeting":
            new = rng.choice(["Hi again,", "Hello,", "Resending this:", "Hey,", "Hi team,"]) + " " + text
        elif kind == "typo":
            new = typo(rng, text)
        elif kind == "signoff":
            new = text + rng.choice(["\nThanks", " Thank you!", "\n-- sent from my phone", " Regards"])
        if new != text:
            return new, kind
    return text + " Thanks!", "signoff"


FOLLOWUP_OPENERS = ["Following up on my ticket from {date}:", "Still waiting on this one.",
                    "Second message about the same problem.", "Re: my earlier request -",
                    "Nobody has replied yet, so again:", "Update on my last message:"]
FOLLOWUP_TAILS = [
    "It is now affecting [my {relative} as well|the whole household|our {n} users] and [I need an answer today|this can't wait any longer].",
    "[Since then|Meanwhile] it has [got worse|happened {count} more times], [please escalate|so please escalate].",
    "I [already|have] [tried everything in the help centre|contacted you {count} times] and [nothing changed|no luck].",
]


def followup(rng: random.Random, orig: dict) -> dict | None:
    """The same customer writing again about the same problem: similar, but not a near copy."""
    ctx = orig["ctx"]
    escalate = {"low": "medium", "medium": "high", "high": "urgent", "urgent": "urgent"}
    answer = dict(orig["answer"], priority=escalate[orig["answer"]["priority"]], sentiment="negative")
    base_text = conversation_text(messages(orig["user"], orig["answer"]))
    for _ in range(40):
        core = orig["user"]
        # drop the sign-off / greeting lines to make it less of a copy, add an opener and a tail
        lines = [ln for ln in core.split("\n") if ln.strip()]
        if len(lines) > 2 and rng.random() < 0.5:
            lines = lines[1:-1]
        text = fill(rng.choice(FOLLOWUP_OPENERS), ctx) + " " + " ".join(lines) + " " + \
            fill(rng.choice(FOLLOWUP_TAILS), ctx)
        if rng.random() < 0.5:
            text += " " + fill(rng.choice(TONES["negative"]), ctx)
        new = dict(orig, user=text, answer=answer)
        sim = jaccard(base_text, conversation_text(messages(text, answer)))
        if 0.58 <= sim <= 0.62:
            new["similarity"] = round(sim, 3)
            return new
    return None


LOG_SOURCES = ["wifi", "dhcpd", "mesh", "kernel", "hostapd", "thermo", "sched", "cloud", "ota"]
LOG_MESSAGES = ["deauth sta={mac} reason={r}", "lease renewed ip=10.0.{a}.{b} mac={mac}",
                "backhaul rssi=-{r}dBm rate={a}Mbps", "watchdog: task {a} stalled for {r}ms",
                "assoc sta={mac} band=5GHz ch={a}", "sync failed: timeout after {r}ms (retry {a})",
                "temperature sample={a}.{b}C setpoint={r}C", "ota: checking manifest v{a}.{b}.{r}",
                "tls handshake failed: code={r}", "mem free={a}{b}KB frag={r}%"]


def pasted_log(rng: random.Random) -> str:
    lines = []
    hh, mm, ss = rng.randint(0, 20), rng.randint(0, 59), rng.randint(0, 59)
    target = rng.randint(4300, 6000)  # characters: over clean.max_chars (4000), a few MB in all
    while sum(len(x) + 1 for x in lines) < target:
        ss += rng.randint(1, 40)
        mm, ss = mm + ss // 60, ss % 60
        hh, mm = (hh + mm // 60) % 24, mm % 60
        mac = ":".join(f"{rng.randint(0, 255):02x}" for _ in range(6))
        msg = rng.choice(LOG_MESSAGES).format(mac=mac, r=rng.randint(1, 999),
                                              a=rng.randint(1, 99), b=rng.randint(0, 99))
        level = rng.choices(["INFO", "WARN", "ERROR"], weights=[6, 3, 1])[0]
        lines.append(f"2024-0{rng.randint(1, 9)}-{rng.randint(10, 28)}T{hh:02d}:{mm:02d}:{ss:02d}Z "
                     f"{level} {rng.choice(LOG_SOURCES)}: {msg}")
    return "\n".join(lines)


def build(seed: int = SEED) -> tuple[list[bytes], dict]:
    rng = random.Random(seed)
    n_natural = TOTAL - sum(INJECT.values())

    seen, natural = set(), []
    while len(natural) < n_natural:
        t = make_ticket(rng, CATEGORIES[len(natural) % len(CATEGORIES)])
        if not 80 <= len(t["user"]) <= 500 or t["user"] in seen:
            continue
        n_words = len(t["answer"]["summary"].split())
        assert 5 <= n_words <= 12, t["answer"]["summary"]
        seen.add(t["user"])
        natural.append(t)
    rng.shuffle(natural)

    # Each row: (sort key, kind, payload). Natural row i sits at key i; a copy of row i goes after it.
    rows = [((i, 0.0), "natural", {"messages": messages(t["user"], t["answer"])})
            for i, t in enumerate(natural)]
    n = len(natural)

    def after(i: int) -> tuple:
        gap = 1 if rng.random() < 0.3 else rng.randint(2, n)
        return (i + gap - 0.5, rng.random())

    picks = rng.sample(range(n), INJECT["exact_duplicate"] + INJECT["near_duplicate"] + INJECT["related_followup"] * 3)
    exact_src = picks[:INJECT["exact_duplicate"] - 5]
    exact_src += exact_src[:5]  # five rows appear three times: clusters larger than a pair
    near_src = picks[len(exact_src) - 5:len(exact_src) - 5 + INJECT["near_duplicate"]]
    follow_pool = picks[len(exact_src) - 5 + INJECT["near_duplicate"]:]

    stats = {"near": [], "followup": [], "near_kinds": {}, "pairs": []}
    for i in exact_src:
        rows.append((after(i), "exact_duplicate", rows[i][2]))  # the same object: same ticket_id
    for i in near_src:
        text, kind = near_variant(rng, natural[i]["user"])
        stats["near_kinds"][kind] = stats["near_kinds"].get(kind, 0) + 1
        msgs = messages(text, natural[i]["answer"])
        stats["near"].append(jaccard(conversation_text(rows[i][2]["messages"]), conversation_text(msgs)))
        rows.append((after(i), "near_duplicate", {"messages": msgs}))
        stats["pairs"].append(("near_duplicate", rows[i][2]["messages"], msgs))
    made = 0
    for i in follow_pool:
        if made == INJECT["related_followup"]:
            break
        f = followup(rng, natural[i])
        if f is None:
            continue
        made += 1
        stats["followup"].append(f["similarity"])
        rows.append((after(i), "related_followup", {"messages": messages(f["user"], f["answer"])}))
        stats["pairs"].append(("related_followup", rows[i][2]["messages"], rows[-1][2]["messages"]))
    assert made == INJECT["related_followup"], made

    def fresh() -> dict:
        while True:
            t = make_ticket(rng)
            if 80 <= len(t["user"]) <= 500 and t["user"] not in seen:
                seen.add(t["user"])
                return t

    def anywhere() -> tuple:
        return (rng.uniform(0, n), rng.random())

    for k in range(INJECT["empty_answer"]):
        t = fresh()
        rows.append((anywhere(), "empty_answer", {"messages": messages(t["user"], "" if k % 4 else "  ")}))
    for k in range(INJECT["blank_user"]):
        t = fresh()
        blank = ["   ", "\n\n", "\t ", " \u00a0 ", "\r\n  "][k % 5]
        rows.append((anywhere(), "blank_user", {"messages": messages(blank, t["answer"])}))
    for k in range(INJECT["overlong"]):
        ctx = Ctx(rng, "router")
        intro = fill("[Hi,|Hello,] {P} [keeps rebooting|drops everything] [since {date}|every night]. "
                     "Here is the [full|whole] system log[:| from the admin page:]\n", ctx)
        answer = {"category": "bug", "priority": rng.choice(["high", "urgent"]), "product": "router",
                  "sentiment": rng.choice(["neutral", "negative"]),
                  "summary": fill("Router [reboots|drops connections] [nightly|repeatedly], log attached", ctx)}
        rows.append((anywhere(), "overlong", {"messages": messages(intro + pasted_log(rng), answer)}))
    for k in range(INJECT["no_answer"]):
        t = fresh()
        msgs = messages(t["user"], t["answer"])
        if k == 0:  # a follow-up question that nobody answered
            msgs.append({"role": "user", "content": "Any update on this? Still waiting."})
        else:
            msgs = msgs[:2]
        rows.append((anywhere(), "no_answer", {"messages": msgs}))
    for k in range(INJECT["missing_messages"]):
        t = fresh()
        payload = [{"message": messages(t["user"], t["answer"])},
                   {"text": t["user"], "status": "draft"},
                   {}][k % 3]
        rows.append((anywhere(), "missing_messages", payload))
    for k in range(INJECT["non_string_content"]):
        t = fresh()
        msgs = messages(t["user"], t["answer"])
        if k == 0:
            msgs[2]["content"] = None
        elif k == 1:
            msgs[1]["content"] = 404
        else:
            msgs[2]["content"] = 3.0
        rows.append((anywhere(), "non_string_content", {"messages": msgs}))
    for k in range(INJECT["malformed_line"]):
        t = fresh()
        rows.append((anywhere(), "malformed_line", {"messages": messages(t["user"], t["answer"]), "_bad": k}))

    rows.sort(key=lambda r: r[0])

    # Ticket ids in file order, with the gaps of a real export; a repeated row keeps its id.
    next_id = 1000 + rng.randint(0, 500)
    for _, kind, payload in rows:
        if "ticket_id" not in payload:
            payload["ticket_id"] = f"T-{next_id:06d}"
            next_id += rng.randint(1, 4)

    lines, kinds = [], []
    for _, kind, payload in rows:
        if kind == "malformed_line":
            k = payload.pop("_bad")
            good = json.dumps(payload, ensure_ascii=False)
            if k < 4:      # export cut off mid-row
                bad = good[: rng.randint(20, len(good) - 10)].encode()
            elif k < 6:    # a Python repr pasted in place of JSON
                bad = repr(payload).encode()
            elif k == 6:   # a trailing comma
                bad = (good[:-1] + ", }").encode()
            elif k == 7:   # another tool's encoding: not UTF-8
                payload["messages"][1]["content"] = "Renée from Zürich here. " + payload["messages"][1]["content"]
                bad = json.dumps(payload, ensure_ascii=False).encode("cp1252", errors="replace")
            elif k == 8:   # valid JSON, but not an object
                bad = json.dumps([payload["ticket_id"], payload["messages"][1]["content"]],
                                 ensure_ascii=False).encode()
            else:          # a stray log line from the export tool
                bad = f"WARN export: skipped {rng.randint(2, 9)} rows after {payload['ticket_id']} (timeout)".encode()
            lines.append(bad)
        else:
            lines.append(json.dumps(payload, ensure_ascii=False).encode())
        kinds.append(kind)
    stats["kinds"] = kinds
    stats["natural"] = natural
    return lines, stats


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def schema_yaml(schema: dict, indent: int = 0) -> str:
    """The schema as block YAML (lists in flow style), to paste under evaluate.json_schema."""
    out = []
    pad = " " * indent
    for key, value in schema.items():
        if isinstance(value, dict):
            out.append(f"{pad}{key}:")
            out.append(schema_yaml(value, indent + 2))
        elif isinstance(value, list):
            out.append(f"{pad}{key}: [{', '.join(json.dumps(v) for v in value)}]")
        else:
            out.append(f"{pad}{key}: {json.dumps(value)}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema as YAML and exit")
    args = parser.parse_args(argv)
    if args.schema:
        print("json_schema:\n" + schema_yaml(TRIAGE_SCHEMA, 2))
        return 0

    lines, stats = build(args.seed)
    data = b"\n".join(lines) + b"\n"
    write_atomic(args.out, data)

    counts = {}
    for kind in stats["kinds"]:
        counts[kind] = counts.get(kind, 0) + 1
    print(f"wrote {args.out} ({len(lines)} lines, {len(data) / 1e6:.2f} MB, "
          f"sha256 {hashlib.sha256(data).hexdigest()[:16]})")
    for kind in ["natural"] + list(INJECT):
        print(f"  {kind:<20} {counts.get(kind, 0):>5}")
    near = sorted(stats["near"])
    print(f"  near-duplicate Jaccard to the original (word 3-shingles, all turns): "
          f"min {near[0]:.2f}, median {near[len(near) // 2]:.2f}; edits {stats['near_kinds']}")
    fol = sorted(stats["followup"])
    print(f"  related follow-up Jaccard to the original: {fol[0]:.2f}-{fol[-1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
