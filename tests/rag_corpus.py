"""A 32-file corpus of notes in English and Chinese, and 40 questions whose answers sit in one file each.

Used by tests/test_rag.py (retrieval hit@3, citations, "not in the documents") and by
benchmarks/bench_rag.py (hit@3 and answer accuracy with and without the documents). The facts
are invented (a model cannot know them without reading the files); the writing is ordinary
office, household and technical prose.
"""

from __future__ import annotations

from pathlib import Path

FILES: dict[str, str] = {
    "projects/falcon_kickoff.md": """# Project Falcon kickoff

Date: 14 March. Attendees: Maria Okafor (lead), Tom Reyes, Aiko Tanaka.

Project Falcon replaces the warehouse barcode scanners with RFID gates at the Rotterdam depot.
The approved budget is 420,000 euros, of which 60,000 is reserved for staff training.
The first gate goes live on 2 June; the remaining eleven gates follow in September.

Risks: the depot's metal racks may reflect the RFID signal. Tom will run a site survey.
""",
    "projects/falcon_survey.txt": """Site survey report, Rotterdam depot, by Tom Reyes.

Reflections from the steel racking were measured in aisles 4 to 9. Readings dropped to 71 percent
accuracy near the cold store. Mounting the antennas 40 centimetres lower fixed the problem:
accuracy returned to 99.2 percent. Recommendation: order the low-mount brackets from Vexon.
""",
    "hr/leave_policy.md": """# Annual leave policy

Full-time employees receive 25 days of paid annual leave per calendar year.
Up to 5 unused days may be carried over to the next year; they expire on 31 March.
Requests for more than two consecutive weeks need approval from the department head
at least six weeks in advance. Part-time staff receive leave pro rata.
""",
    "hr/expenses.md": """# Travel expenses

Economy class is the rule for flights under six hours. Hotel nights are reimbursed up to
150 euros in most cities and up to 220 euros in London, Paris and Zurich.
Meals are paid as a daily allowance of 45 euros. Submit receipts within 30 days through
the Expensa portal; late claims are paid only with the finance director's approval.
""",
    "home/sourdough.md": """# Sourdough loaf

Feed the starter the night before. Mix 500 g bread flour, 350 g water and 100 g active starter.
Rest 45 minutes, then add 10 g salt. Do four sets of stretch and folds, 30 minutes apart.
Proof overnight in the fridge. Bake in a Dutch oven at 250 degrees for 20 minutes with the lid on,
then 25 minutes at 230 degrees with the lid off.
""",
    "home/garden_log.txt": """Garden log.

April: planted three rows of Charlotte potatoes and a bed of broad beans.
May: the tomato seedlings (Sungold and San Marzano) went into the greenhouse on the 12th.
June: slugs ate half the lettuce; switched to wool pellets around the bed.
July: first Sungold tomatoes picked on the 9th. Potatoes lifted: 14 kilograms from three rows.
""",
    "travel/lisbon_trip.md": """# Lisbon trip

Flight TP1351 leaves at 07:40 on Friday 3 October. Hotel: Casa do Rio in Alfama, three nights,
booking reference QX7-2291. Saturday: tram 28 to Estrela and lunch at the Mercado de Campo de Ourique.
Sunday: day trip to Sintra by train from Rossio station; buy the Pena Palace tickets online.
""",
    "travel/kyoto_notes.txt": """Kyoto notes.

The ryokan near Gion is called Hanaya; check-in from 15:00, dinner is served at 18:30.
The Fushimi Inari shrine is best before 8 in the morning. For Arashiyama take the JR Sagano line.
A one-day city bus pass cost 700 yen; it covers the flat-fare area only.
""",
    "tech/backup.md": """# Backups

The NAS in the study runs restic every night at 02:15. Snapshots are kept for 7 days,
4 weeks and 12 months. An offsite copy goes to a Backblaze B2 bucket named family-archive-eu.
To restore one file: restic restore latest --target /tmp/restore --include PATH.
The repository password is in the paper envelope in the fire safe.
""",
    "tech/router.txt": """Home network.

The router is a Fritzbox 7590 at 192.168.178.1. The guest Wi-Fi is called Lindenhof-Gast and is
switched off automatically at midnight. The printer has the fixed address 192.168.178.30.
The fibre line was installed in 2023; the contract with the provider runs until November 2026.
""",
    "tech/api_rate_limits.md": """# Orders API rate limits

Each API key may send 600 requests per minute. Bursts above the limit receive HTTP 429 with a
Retry-After header. Bulk export endpoints have a separate quota of 20 jobs per day.
Webhook deliveries are retried five times with exponential backoff starting at 30 seconds.
""",
    "tech/deploy_runbook.md": """# Deploy runbook

Deploys happen on Tuesdays and Thursdays after 10:00. Run the smoke tests with make smoke
before switching traffic. Roll back with the command deployctl rollback --to previous.
The on-call engineer must post in the #releases channel when a deploy starts and ends.
""",
    "finance/q3_report.md": """# Third quarter summary

Revenue in the third quarter was 3.8 million euros, up 12 percent on the second quarter.
The gross margin fell to 41 percent because of higher freight costs.
Headcount grew from 52 to 58. The largest new customer is Nordlicht Logistics.
""",
    "finance/insurance.txt": """Insurance overview.

Household contents are insured with Alvora for 85,000 euros; the excess is 250 euros.
The car policy renews every 1 February. Bicycle theft is covered only when the bike is locked
to a fixed object. Claims must be reported within 7 days.
""",
    "health/vaccinations.md": """# Vaccination record

Tetanus booster: May 2021, next due 2031. Tick-borne encephalitis: third dose in March 2024.
Flu vaccine every October at the pharmacy on Linden Street. The yellow fever certificate
is valid for life and is kept with the passports.
""",
    "school/chemistry_lab.md": """# Chemistry lab rules

Goggles stay on for the whole session. Acids are diluted by adding the acid to water,
never the water to the acid. Broken glass goes into the yellow bin, not the normal waste.
The eye-wash station is next to the north door and is tested every Monday.
""",
    "zh/年假制度.md": """# 公司年假制度

正式员工每年享有十五天带薪年假，入职满五年后增加到二十天。
未休完的年假最多可以顺延五天，顺延的假期必须在次年六月三十日前休完。
连续休假超过十天需要提前一个月向部门经理提交申请。
""",
    "zh/北京出差.md": """# 北京出差安排

出发时间为十一月八日早上七点二十分，乘坐G101次高铁，从上海虹桥站出发。
住宿安排在国贸附近的华晨酒店，共住三晚。
十一月九日下午两点与星河科技的刘经理开会，讨论明年的采购合同。
""",
    "zh/红烧肉.txt": """红烧肉做法

五花肉切成三厘米见方的块，冷水下锅焯水后捞出。
锅中放少许油和三十克冰糖，小火炒出糖色，再放入肉块翻炒上色。
加入生抽、老抽、料酒、八角和姜片，倒入热水没过肉块，小火炖一个半小时，最后大火收汁。
""",
    "zh/服务器维护.md": """# 服务器维护通知

机房将在本周六凌晨一点到五点进行电力改造，期间数据库集群暂停服务。
维护负责人是运维部的王磊，紧急联系电话是内线八六二零。
维护结束后请各业务组检查定时任务是否正常恢复。
""",
    "zh/读书会.txt": """读书会记录

本月读书会选读的是《百年孤独》，时间定在每月最后一个周五晚上七点。
地点在图书馆三楼的小会议室。下个月轮到陈静负责主持，书目是《活着》。
""",
    "zh/装修进度.md": """# 新家装修进度

水电改造已于九月二十日完成验收。瓷砖选用了六十乘一百二十厘米的灰色岩板。
橱柜由欧派定制，预计十月十五日安装。全部工程的总预算为十八万元，目前已支付十一万。
""",
    "zh/数据库备份.md": """# 数据库备份策略

生产数据库每天凌晨三点做一次全量备份，每小时做一次增量备份。
备份文件保存在杭州的对象存储，保留三十天。
每个季度要做一次恢复演练，上一次演练用了四十二分钟完成恢复。
""",
    "zh/报销流程.md": """# 费用报销流程

员工应在费用发生后二十天内提交报销单，并附上发票原件。
单笔金额超过五千元需要财务总监审批。
报销款项每月十日和二十五日统一发放到工资卡。
""",
    "zh/猫咪健康.txt": """猫咪健康记录

家里的橘猫叫豆豆，今年四岁，体重五点二公斤。
每年三月打一次猫三联疫苗，每三个月做一次体内驱虫。
上次体检在宠物医院发现有轻微牙结石，医生建议半年后洗牙。
""",
    "zh/产品发布.md": """# 新品发布计划

智能台灯“星光二代”计划在十二月五日发布，售价三百九十九元。
首批生产一万台，由东莞的工厂代工。
发布会在深圳会展中心举行，预计邀请两百名媒体和经销商。
""",
    "zh/课程安排.txt": """钢琴课程安排

女儿的钢琴课在每周三下午四点半，老师姓周。
今年十二月要参加四级考试，考试曲目是巴赫的《小步舞曲》。
每节课四十五分钟，学费是每节二百八十元。
""",
    "zh/旅行计划.md": """# 云南旅行计划

第一天从昆明飞往丽江，住在古城里的客栈。
第二天去玉龙雪山，需要提前三天在网上预约索道票。
第三天包车去泸沽湖，车程大约四个小时，包车费用是八百元。
""",
    "zh/会议纪要.md": """# 市场部周会纪要

本周线上广告投入四万二千元，带来新用户三千一百人。
小红书渠道的转化率最高，达到百分之六点五。
下周由李娜负责整理竞品分析报告，周四之前发到群里。
""",
    "zh/网络配置.txt": """办公室网络配置

主路由器的管理地址是十点零点零点一。访客网络的名称是“访客专用”，密码每月一号更换。
打印机使用固定地址，网络存储的容量是十六TB。
""",
    "notes/meeting_vendor.md": """# Vendor call with Vexon

Vexon quoted 38 euros per low-mount bracket, delivery in three weeks. Minimum order is 200 units.
Payment terms: 30 days net. Their account manager is Lena Fischer.
""",
    "notes/book_club.md": """# Book club

This month we read The Remains of the Day. We meet at Hannah's flat on the second Sunday of
the month at five. Next month's pick is Klara and the Sun, chosen by Oliver.
""",
}

# (question, file that answers it, a word or number the right answer contains)
QUESTIONS: list[tuple[str, str, str]] = [
    ("What is the approved budget of Project Falcon?", "projects/falcon_kickoff.md", "420"),
    ("When does the first RFID gate go live at the Rotterdam depot?", "projects/falcon_kickoff.md", "June"),
    ("How much did lowering the antennas improve the scanning accuracy near the cold store?", "projects/falcon_survey.txt", "99.2"),
    ("How many days of paid annual leave do full-time employees get?", "hr/leave_policy.md", "25"),
    ("Until when can carried-over leave days be used?", "hr/leave_policy.md", "31 March"),
    ("What is the hotel limit for a night in London?", "hr/expenses.md", "220"),
    ("How much water goes into the sourdough dough?", "home/sourdough.md", "350"),
    ("How many kilograms of potatoes were lifted in July?", "home/garden_log.txt", "14"),
    ("What is the booking reference of the hotel in Alfama?", "travel/lisbon_trip.md", "QX7-2291"),
    ("What time is dinner served at the ryokan in Gion?", "travel/kyoto_notes.txt", "18:30"),
    ("At what time does restic run the nightly backup on the NAS?", "tech/backup.md", "02:15"),
    ("What is the IP address of the printer?", "tech/router.txt", "192.168.178.30"),
    ("How many requests per minute may one API key send?", "tech/api_rate_limits.md", "600"),
    ("Which command rolls back a deploy?", "tech/deploy_runbook.md", "rollback"),
    ("What was the revenue in the third quarter?", "finance/q3_report.md", "3.8"),
    ("What is the excess on the household contents insurance?", "finance/insurance.txt", "250"),
    ("When is the next tetanus booster due?", "health/vaccinations.md", "2031"),
    ("Where is the eye-wash station in the chemistry lab?", "school/chemistry_lab.md", "north"),
    ("How much does Vexon charge per low-mount bracket?", "notes/meeting_vendor.md", "38"),
    ("Which book is next month's pick of the book club?", "notes/book_club.md", "Klara"),
    ("Who is the largest new customer in the third quarter?", "finance/q3_report.md", "Nordlicht"),
    ("How often are webhook deliveries retried?", "tech/api_rate_limits.md", "five"),
    ("How long do restic snapshots of the monthly kind stay?", "tech/backup.md", "12"),
    ("What is the daily meal allowance on business trips?", "hr/expenses.md", "45"),
    ("正式员工每年有几天带薪年假？", "zh/年假制度.md", "十五"),
    ("去北京出差坐的是哪一班高铁？", "zh/北京出差.md", "G101"),
    ("做红烧肉炒糖色要放多少冰糖？", "zh/红烧肉.txt", "三十"),
    ("机房电力改造期间的维护负责人是谁？", "zh/服务器维护.md", "王磊"),
    ("读书会下个月的书目是什么？", "zh/读书会.txt", "活着"),
    ("装修的总预算是多少？", "zh/装修进度.md", "十八万"),
    ("生产数据库的备份文件保留多少天？", "zh/数据库备份.md", "三十"),
    ("单笔报销金额超过多少需要财务总监审批？", "zh/报销流程.md", "五千"),
    ("橘猫豆豆的体重是多少？", "zh/猫咪健康.txt", "五点二"),
    ("星光二代台灯的售价是多少？", "zh/产品发布.md", "三百九十九"),
    ("女儿的钢琴课在星期几？", "zh/课程安排.txt", "周三"),
    ("去泸沽湖包车的费用是多少？", "zh/旅行计划.md", "八百"),
    ("哪个渠道的转化率最高？", "zh/会议纪要.md", "小红书"),
    ("访客网络的密码多久更换一次？", "zh/网络配置.txt", "每月"),
    ("上一次数据库恢复演练用了多长时间？", "zh/数据库备份.md", "四十二"),
    ("和星河科技的刘经理什么时候开会？", "zh/北京出差.md", "九日"),
]

# Questions the corpus does not answer: their words are not in the documents.
UNANSWERABLE: list[str] = [
    "What is the capital of Peru?",
    "Who won the 1998 football World Cup final?",
    "珠穆朗玛峰有多高？",
]


def write_corpus(root: Path) -> Path:
    """Write FILES under `root` and return it."""
    for rel, text in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root
